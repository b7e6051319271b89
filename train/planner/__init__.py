"""Layout math without a GPU: memory per rank, tensor parallelism's collectives, pipeline schedules, and the throughput
planner behind launch/plan.py."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["memory", "plan", "plan_tp", "plan_pp"]
