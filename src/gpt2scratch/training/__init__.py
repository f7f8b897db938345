"""Training: the loop, its state, the run directory, checkpoints, the optimizer and schedule, metrics and plots."""
