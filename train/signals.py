"""Stop on request: SIGTERM or SIGUSR1 (SLURM's preemption and time-limit warnings) ask the run to
finish its current step, checkpoint, and exit with EXIT_STOPPED so the job can be requeued.
The trainer folds the flag into its one per-step all-reduce, so every rank stops after the same step."""

import json
import os
import signal
from pathlib import Path

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# launch/slurm/torchrun.py names a fresh folder here for each attempt; see mark_stopped.
STOP_MARKERS_ENV = "LLM_PRETRAIN_STOP_MARKERS"

_received: list[int] = []  # stop signals this process got (module state: catch_early's must reach the loop)


def _handle(signum, frame) -> None:
    _received.append(signum)  # only a flag: the loop acts on it between steps


def catch_early() -> None:
    """Catch SIGUSR1 from process start (launch/pretrain.py calls this first): SLURM's warning can
    land during start-up or resume, and its default action would kill the process; caught, the run
    stops after its first step. SIGTERM keeps its default until the loop starts, so a rank whose
    peer failed during start-up still dies at once when torchrun sends it SIGTERM."""
    signal.signal(signal.SIGUSR1, _handle)
    # launch/slurm/torchrun.py starts its workers with SIGUSR1 blocked, so that one sent before this
    # handler existed is still pending: unblocked, it reaches the handler now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


class StopRequest:
    def __init__(self):
        for s in STOP_SIGNALS:
            signal.signal(s, _handle)

    @property
    def signum(self) -> int | None:
        return _received[0] if _received else None


def mark_stopped() -> None:
    """Leave a marker saying this worker checkpointed after a stop request and is exiting with
    EXIT_STOPPED (call it just before that exit). launch/slurm/torchrun.py asks for requeue only when
    every one of its workers left one: torchrun records the exit status only of workers that had
    ended when it noticed the first, and SIGTERMs the rest, so exit statuses alone cannot tell a
    clean stop from a crash. Does nothing outside that wrapper (the variable is unset)."""
    folder = os.environ.get(STOP_MARKERS_ENV)
    if not folder:
        return
    local_rank = os.environ.get("LOCAL_RANK", "0")
    marker = {"rank": int(os.environ.get("RANK", "0")), "local_rank": int(local_rank), "pid": os.getpid()}
    (Path(folder) / f"local_rank{local_rank}").write_text(json.dumps(marker) + "\n")
