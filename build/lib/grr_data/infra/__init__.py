"""Infrastructure kept once: atomic file writes (files), folder locks (lock), worker processes and
usable cores (procs), rate-limited skip logging (skips), the PIL build in use (pil_info)."""
