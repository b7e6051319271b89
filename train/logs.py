"""Logging of a run: every rank to `<run>/logs/rank<r>.log`, rank 0 also to the console."""

import logging
import sys
from pathlib import Path

log = logging.getLogger("train")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Every rank logs to run_dir/logs/rank<r>.log; rank 0 also to the console."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    # On a full disk every log write fails, ours and W&B's: without this each one prints a
    # "--- Logging error ---" traceback. The write that matters (a checkpoint) reports it in one line.
    logging.raiseExceptions = False
