"""grr_train: the CoCa models, losses, training, checkpoints and evaluation."""
