"""Training: settings (config), what a run checks and builds before its first step (setup), the
loop (trainer), one optimizer step (step), losses, schedule, early stopping, validation, and the
benchmark of the step (bench)."""
