"""`grr data shard`: input -> tokenized, split shards and manifest.json. The run (run), its inputs
(inputs, plain), the per-tar work files a resume reads (workfiles), the shard writers (write) and
the split rule (split)."""
