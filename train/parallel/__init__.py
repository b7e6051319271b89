"""Parallelism: the process group and device mesh, the model built and parallelized in one fixed order (float8, tensor
parallel, activation checkpointing, compile, FSDP2; pipeline stages first), the vocabulary-parallel loss, and the
start-up memory gate."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["distributed", "build", "parallelize", "tensor_parallel", "pipeline", "loss_parallel", "memory_gate"]
