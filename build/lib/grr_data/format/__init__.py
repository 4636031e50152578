"""The formats a set is made of: the token layout (layout), stored images (image), shard tars,
their indexes and per-sample checksums (records), and the set's manifest.json (manifest)."""
