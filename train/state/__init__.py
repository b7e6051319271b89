"""What a run keeps on disk to lose nothing: checkpoints and their folders, rollback on a loss spike and the stability
verdicts behind it, the sample ledger, and the run folder's lock."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["checkpoint", "checkpoint_io", "rollback", "stability", "ledger", "run_lock"]
