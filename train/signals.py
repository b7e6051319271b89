"""Stop on request: SIGTERM or SIGUSR1 (SLURM's preemption and time-limit warnings) ask the run to
finish its current step, checkpoint, and exit with EXIT_STOPPED so the job can be requeued.
The trainer folds the flag into its one per-step all-reduce, so every rank stops after the same step."""

import signal

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # only a flag: the loop acts on it between steps
