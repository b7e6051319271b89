"""Offline evaluation (launch/eval.py): loss, perplexity and bits per byte of a checkpoint on shard sets and raw text,
and lm-evaluation-harness tasks on our model."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["evaluate", "harness"]
