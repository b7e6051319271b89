"""What a run shows: its log files, metric sinks (console, JSONL, W&B, TensorBoard), appending to JSONL, a step under
torch.profiler, and the report's curves."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["logs", "metrics", "jsonl", "profiler", "report"]
