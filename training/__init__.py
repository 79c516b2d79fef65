"""Training and evaluation program of DGL (used by main.py): flags, distributed helpers, optimiser and
schedule, train / eval loops, checkpoints, the output folder and the run's records."""
