"""Stop on request: SIGTERM or SIGUSR1 (SLURM's preemption and time-limit warnings) ask the run to
finish its current step, checkpoint, and exit with EXIT_STOPPED so the job can be requeued.
The trainer folds the flag into its one per-step all-reduce, so every rank stops after the same step."""

import signal

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []  # stop signals this process got (module state: catch_early's must reach the loop)


def _handle(signum, frame) -> None:
    _received.append(signum)  # only a flag: the loop acts on it between steps


def catch_early() -> None:
    """Catch SIGUSR1 from process start (launch/pretrain.py calls this first): SLURM's warning can
    land during start-up or resume, and its default action would kill the process; caught, the run
    stops after its first step. SIGTERM keeps its default until the loop starts, so a rank whose
    peer failed during start-up still dies at once when torchrun sends it SIGTERM."""
    signal.signal(signal.SIGUSR1, _handle)


class StopRequest:
    def __init__(self):
        for s in STOP_SIGNALS:
            signal.signal(s, _handle)

    @property
    def signum(self) -> int | None:
        return _received[0] if _received else None
