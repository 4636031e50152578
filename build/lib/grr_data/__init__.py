"""grr_data: dataset sources, fetching, tokenization, sharding and loaders. Never imports the model."""
