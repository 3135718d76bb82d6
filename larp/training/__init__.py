"""Training (train.py): typed configs, the two stages, optimizers, the resumable loader, checkpoints, the loop."""
