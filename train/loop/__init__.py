"""The training loop: one job's process from config to result, the trainer and its step runner, and what is due and
what is hooked around a step (cadence, hooks, progress, throughput, validation, the end-of-run sample, stop signals)."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["job", "trainer", "step", "hooks", "cadence", "progress", "throughput", "validation", "sampling", "data",
           "signals"]
