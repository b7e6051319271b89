"""`llm-pretrain --nproc_per_node=N [torchrun's options] +conf=NAME [key=value ...]`: N workers of launch/pretrain.py
on this machine through torch's elastic launch, run in this process, reporting a failure as the failing rank's one
line and its exit status instead of torchrun's `ChildFailedError` traceback.

What differs from `torchrun launch/pretrain.py ...` (which works as before):
- Only local rank 0 writes to the console (the project logs from rank 0; every rank has logs/rank<r>.log); the
  other ranks' stdout and stderr go to files of a temporary folder, from which a failing rank's line is read.
- A failure prints no traceback of torch's: rank 0's own line is on the console already; when another rank failed
  first and rank 0 only lost it (status 76), or rank 0 did not fail, that rank's `error (rank N): ...` line (or the
  end of its stderr, for a crash) is printed. The exit status is the reported rank's (75 for a clean stop).
- --standalone unless the command names a rendezvous (--nnodes, --rdzv-*, --master-*).
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .cli_args import ERROR_LINES_ENV  # fail() leaves each rank's line in the folder it names

EXIT_STOPPED, EXIT_PEER_LOST = 75, 76  # as in train/loop/signals.py (not imported: torch-free until launching)
STOP_MARKERS_ENV = "LLM_PRETRAIN_STOP_MARKERS"  # train/loop/signals.py mark_stopped writes one per clean stop
RENDEZVOUS_FLAGS = ("--nnodes", "--rdzv", "--master", "--standalone", "--node")
# torchrun's own lines around a failure or a stop, which the reported line replaces
TORCHRUN_LINES = ("failed (exitcode", "Sending process", "Received ", "Closing process")


def split_args(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(torchrun's options, the config overrides) when the command starts with torchrun options that include
    --nproc_per_node (or --nproc-per-node); None otherwise (a worker, or one process)."""
    options, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        options.append(argv[i])
        takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("-")
        if takes_value and "=" not in argv[i + 1]:  # `--nproc_per_node 2`; not `--standalone +conf=x`
            options.append(argv[i + 1])
            i += 1
        i += 1
    if not any(o.startswith(("--nproc_per_node", "--nproc-per-node")) for o in options):
        return None
    return options, argv[i:]


def quiet_torchrun(record: logging.LogRecord) -> bool:
    """Logging filter: drop torchrun's lines about a failure or stop (the reported line says it)."""
    return not str(record.msg).startswith(TORCHRUN_LINES)


def stderr_of(log_dir: Path, local_rank: int) -> str:
    """What local rank wrote to stderr in its latest attempt ('' when nothing was kept)."""
    files = sorted(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"),
                   key=lambda f: int(f.parent.parent.name.removeprefix("attempt_")))
    return files[-1].read_text(errors="replace") if files else ""


def lines_said(folder: Path) -> dict[int, tuple[int, str]]:
    """{rank: (exit status, its `error (rank N): ...` line)} of the ranks whose fail() ran (launch/cli_args.py)."""
    said = {}
    for f in folder.glob("rank*"):
        status, _, line = f.read_text().partition(" ")
        said[int(f.name.removeprefix("rank"))] = (int(status), line.rstrip("\n"))
    return said


def reported_rank(failures: dict, said: dict) -> int:
    """The rank whose failure the user is told: local rank 0 when it printed an error of its own (not a lost
    peer), which is on the console already; else the first rank to fail on its own account. failures: torch's
    {global rank: ProcessFailure}, which records as SIGTERMed (-15) a rank still ending when it saw the first."""
    for rank, failure in failures.items():
        if failure.local_rank == 0 and said.get(rank, (EXIT_PEER_LOST,))[0] != EXIT_PEER_LOST:
            return rank
    own = {r: f for r, f in failures.items() if f.exitcode > 0 and f.exitcode != EXIT_PEER_LOST}
    candidates = own or {r: f for r, f in failures.items() if f.exitcode > 0} or failures
    return min(candidates, key=lambda r: (candidates[r].timestamp, r))


def report(failures: dict, said: dict, log_dir: Path) -> int:
    """Print the reported rank's line (unless it is on the console already); return its exit status."""
    rank = reported_rank(failures, said)
    failure = failures[rank]
    status = said[rank][0] if rank in said else failure.exitcode
    if failure.local_rank != 0:
        lines = [said[rank][1]] if rank in said else stderr_of(log_dir, failure.local_rank).splitlines()[-20:]
        sys.stderr.write("\n".join(lines or [f"error (rank {rank}): exited with status {failure.exitcode}; "
                                              f"see its logs/rank{rank}.log"]) + "\n")
    return status if status > 0 else 128 - status  # -15 (SIGTERM): 143


def torchrun_options(options: list[str], nproc: int, log_dir: Path) -> list[str]:
    """The user's options, plus a standalone rendezvous when none is named, and the other ranks' output into
    log_dir (local rank 0 keeps the console)."""
    standalone = [] if any(o.startswith(RENDEZVOUS_FLAGS) for o in options) else ["--standalone"]
    quiet_ranks = ",".join(f"{r}:3" for r in range(1, nproc)) or "0"
    return [*standalone, *options, f"--log-dir={log_dir}", f"--redirects={quiet_ranks}"]


def launch(options: list[str], overrides: list[str], script: Path) -> None:
    """Run torch's elastic launch of `script` with the overrides; exit with the status the user should see."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.launcher.api"):
        logging.getLogger(name).addFilter(quiet_torchrun)
    nproc = determine_local_world_size(parse_args([*options, str(script)]).nproc_per_node)
    work = Path(tempfile.mkdtemp(prefix="llm-pretrain-"))
    log_dir, markers, said = work / "logs", work / "stopped", work / "said"
    markers.mkdir()
    said.mkdir()
    os.environ[STOP_MARKERS_ENV] = str(markers)  # the workers inherit these
    os.environ[ERROR_LINES_ENV] = str(said)
    status = 0
    try:
        run(parse_args([*torchrun_options(options, nproc, log_dir), str(script), *overrides]))
    except ChildFailedError as e:
        status = report(e.failures, lines_said(said), log_dir)
    except SignalException as e:  # Ctrl-C or SIGTERM: passed on to the workers, which checkpoint and stop
        stopped = len(list(markers.glob("local_rank*"))) == nproc
        status = EXIT_STOPPED if stopped else 128 + int(e.sigval)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(status)


def main(argv: list[str], script: Path) -> None:
    """Launch when argv starts with torchrun options naming --nproc_per_node; else return (run in this process)."""
    split = split_args(argv)
    if split is None:
        return
    from train.observe.logs import guard_console  # no torch

    guard_console()  # `... 2>&1 | tee log`, then Ctrl-C: this launcher's lines go nowhere instead of raising
    launch(*split, script)
