"""torchrun with the stop protocol a SLURM batch script can act on. Same arguments as torchrun.

Two differences, both for preemption:
- SIGUSR1 and SIGTERM sent to this agent are forwarded to the workers as SIGUSR1, which asks them to
  finish the step, checkpoint and exit with EXIT_STOPPED. Plain torchrun dies of SIGUSR1 (leaving
  the workers behind) unless told to handle it, and a signal it handles ends in SIGKILL for workers
  still saving after --shutdown-timeout (30 s).
- The exit status is EXIT_STOPPED when the workers stopped on request (plain torchrun exits 1 for
  any worker failure), so the batch script can tell "requeue me" from "I failed".
"""

import os
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

EXIT_STOPPED = 75  # train/signals.py (not imported: the agent needs only torch)
stop_requested = False


def workers() -> list[int]:
    """Processes whose parent is this agent (torchrun starts each worker as a direct child)."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return out


def forward(signum, frame) -> None:
    global stop_requested
    stop_requested = True
    print(f"[slurm/torchrun] got {signal.Signals(signum).name}; asking the workers to checkpoint and stop",
          file=sys.stderr, flush=True)
    for pid in workers():
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass


def main() -> None:
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, forward)
    # Keep torchrun from replacing our SIGTERM handler (it installs its own when workers start).
    args = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *sys.argv[1:]]
    try:
        torchrun_main(args)
    except ChildFailedError as e:
        print("[slurm/torchrun] workers exited: " + ", ".join(f"rank {rank} with status {f.exitcode}"
              for rank, f in sorted(e.failures.items())), file=sys.stderr, flush=True)
        # The first exit decides: once a worker stops, torchrun sends SIGTERM to the rest, which can
        # land after their checkpoint, during interpreter shutdown, and kill them. After a stop
        # request any exit counts as a stop: saves are atomic, so the latest checkpoint is intact.
        first = e.get_first_failure()[1].exitcode
        sys.exit(EXIT_STOPPED if stop_requested or first == EXIT_STOPPED else 1)


if __name__ == "__main__":
    main()
