"""Training: the loop (loop/), parallelism (parallel/), what a run keeps (state/), what it shows (observe/),
other formats (interop/), offline evaluation (evaluation/) and layout math (planner/); config.py and optim.py are
shared by them."""

__all__ = ["config", "optim", "loop", "parallel", "state", "observe", "interop", "evaluation", "planner"]
