"""The training loop, optimizers (Muon + AdamW), schedules, checkpoints and logging."""
