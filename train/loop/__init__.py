"""The training loop: one job's process from config to result, the trainer and its step, and what is due around a step
(cadence, progress, throughput, validation, the end-of-run sample, stop signals)."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["job", "trainer", "step", "cadence", "progress", "throughput", "validation", "sampling", "data", "signals",
           "faults"]
