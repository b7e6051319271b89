"""Training: process groups, parallelisation, the loop, optimizer, checkpoints, metrics."""
