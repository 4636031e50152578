"""What a run leaves on disk: checkpoint folders (names, checks, whole and sharded saves, loading),
the metrics log and the run's own copy of its tokenizer."""
