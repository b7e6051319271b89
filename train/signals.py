"""Stop on request: SIGTERM or SIGUSR1 (SLURM's preemption and time-limit warnings) ask the run to
finish its current step, checkpoint, and exit with EXIT_STOPPED so the job can be requeued."""

import signal

import torch
import torch.distributed as dist

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # only a flag: the loop acts on it between steps

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got a stop signal (one tiny all-reduce), so all ranks
        stop after the same step."""
        flag = torch.tensor([1 if self.signum else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
