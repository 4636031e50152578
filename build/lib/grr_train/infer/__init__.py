"""Using a trained model: caption decoding (generate), captions of image files (captioning) and
the Hugging Face export (export)."""
