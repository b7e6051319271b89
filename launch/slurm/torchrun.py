"""torchrun with the stop protocol a SLURM batch script can act on. Same arguments as torchrun; on one machine
too, where a stop (Ctrl-C, SIGTERM) ends in one line and status 75 instead of plain torchrun's traceback and 1.

Two differences, both for preemption:
- SIGUSR1 and SIGTERM sent to this agent are forwarded to the workers as SIGUSR1, which asks them to
  finish the step, checkpoint and exit with EXIT_STOPPED. Plain torchrun dies of SIGUSR1 (leaving
  the workers behind) unless told to handle it, and a signal it handles ends in SIGKILL for workers
  still saving after --shutdown-timeout (30 s). A request during start-up (this agent's or the
  workers') waits for them instead of killing them: see main.
- The exit status is EXIT_STOPPED when every worker of this node stopped cleanly (plain torchrun
  exits 1 for any worker failure), so the batch script can tell "requeue me" from "I failed"; also
  after a Ctrl-C (SIGINT), which torchrun passes on to the workers as it is (a stop request too).

A third, for a lost node: when every worker of this node that failed had lost a peer in training (another
node's process died or that node went away; they exit EXIT_PEER_LOST), so does this agent, and the batch
script may requeue the job. And before torchrun starts, a node that does not host the rendezvous checks
that it can reach it, and says in one line which host and port it could not reach, instead of torchrun's
long wait and traceback.

"Stopped cleanly" cannot be read from exit statuses: torchrun records them only for the workers
that had ended when it noticed the first, then SIGTERMs the rest, which may land during their
interpreter shutdown after their checkpoint. So each worker that checkpointed after a stop request
writes a marker into a folder this agent names (train/loop/signals.py mark_stopped) just before it
exits with EXIT_STOPPED; this agent exits EXIT_STOPPED only when all of its workers left one.
"""

import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from train.observe.logs import guard_console  # train/observe/logs.py alone: no torch

# From train/loop/signals.py (not imported: the agent needs only torch).
EXIT_STOPPED = 75
EXIT_PEER_LOST = 76
RDZV_WAIT_S = int(os.environ.get("RDZV_WAIT_S", "300"))  # how long a node waits for the rendezvous host
STOP_MARKERS_ENV = "LLM_PRETRAIN_STOP_MARKERS"
# pretrain.sbatch names a folder here, the same on every node, for each node's exit status (srun returns only
# the highest): a node whose workers failed (1) beside others that lost them as peers (76) is not requeued.
NODE_STATUS_ENV = "LLM_PRETRAIN_NODE_STATUS"
stop_requested = threading.Event()


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


def request_stop(name: str) -> None:
    print(f"[slurm/torchrun] got {name}; asking the workers to checkpoint and stop", file=sys.stderr, flush=True)
    stop_requested.set()


def forward_stop_requests() -> None:
    """Thread: takes the agent's SIGUSR1 (blocked in every thread, see main) and, once a stop is requested,
    sends SIGUSR1 to each worker, also to workers that start later (a request during the rendezvous)."""
    told: set[int] = set()
    while True:
        if signal.sigtimedwait({signal.SIGUSR1}, 0.1) is not None:
            request_stop("SIGUSR1")
        if not stop_requested.is_set():
            continue
        for pid in set(workers()) - told:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            told.add(pid)


def exit_status(markers: Path, nproc: int, failures: dict) -> int:
    """EXIT_STOPPED when each of the nproc local workers left a stop marker; EXIT_PEER_LOST when, with no
    stop requested, every failed worker lost a peer elsewhere; else 1. After a stop request, names in
    one line the workers that did not stop cleanly."""
    stopped = {int(f.name.removeprefix("local_rank")) for f in markers.glob("local_rank*")}
    missing = sorted(set(range(nproc)) - stopped)
    if not missing:
        print(f"[slurm/torchrun] every worker checkpointed and stopped: exiting {EXIT_STOPPED}; the same command "
              "resumes", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    if not stop_requested.is_set() and failures and all(f.exitcode == EXIT_PEER_LOST for f in failures.values()):
        print(f"[slurm/torchrun] the workers on {socket.gethostname()} lost a peer on another node: exiting "
              f"{EXIT_PEER_LOST} (worth a requeue)", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    if stop_requested.is_set() or stopped:  # else a plain failure: the line above said how the workers exited
        global_rank = {f.local_rank: rank for rank, f in failures.items()}
        names = ", ".join(f"local rank {r}" + (f" (rank {global_rank[r]})" if r in global_rank else "")
                          for r in missing)
        print(f"[slurm/torchrun] stop requested, but {names} did not checkpoint and exit with status "
              f"{EXIT_STOPPED}: exiting 1 (not to be requeued)", file=sys.stderr, flush=True)
    return 1


def not_a_stop(record) -> bool:
    """Logging filter: drop torchrun's "failed (exitcode: 75) local_rank: ..." error line, which a clean stop
    (every worker exits EXIT_STOPPED) would otherwise print as a failure."""
    return not (str(record.msg).startswith("failed (exitcode") and record.args and record.args[0] == EXIT_STOPPED)


def wait_for_rendezvous(endpoint: str, wait_s: int) -> None:
    """On a node that does not host the rendezvous (c10d: the host whose name or address the endpoint
    names), wait until host:port accepts a connection; exit 1 in one line naming both when it does not."""
    host, _, port = endpoint.rpartition(":")
    here = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError as e:
        sys.exit(f"error: the rendezvous host {host} (--rdzv-endpoint {endpoint}) does not resolve on {here} ({e}); "
                 f"set MASTER_ADDR to a name or address every node can resolve")
    try:
        mine = set(socket.gethostbyname_ex(here)[2])
    except OSError:
        mine = set()
    if host in (here, socket.getfqdn()) or address in mine or address.startswith("127."):
        return  # torchrun hosts the rendezvous here
    deadline = time.time() + wait_s
    while True:
        try:
            socket.create_connection((address, int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.time() > deadline:
                sys.exit(f"error: {here} cannot reach the rendezvous at {host}:{port} ({address}) after {wait_s} s "
                         f"({e.strerror or e}): is the job's first node up, and is port {port} open between "
                         f"the nodes (MASTER_PORT; the interface: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)?")
            time.sleep(1)


def rendezvous_endpoint(args: list[str]) -> str | None:
    """The --rdzv-endpoint (or --rdzv_endpoint) of a multi-node command line, else None."""
    for i, arg in enumerate(args):
        for flag in ("--rdzv-endpoint", "--rdzv_endpoint"):
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def main() -> None:
    # `... 2>&1 | tee log` and Ctrl-C ends tee too: this agent's lines then go nowhere instead of raising
    # BrokenPipeError into torchrun (exit 1, workers SIGTERMed). Before torch's import, whose log handlers
    # take sys.stderr as it is then.
    guard_console()
    signal.signal(signal.SIGTERM, lambda signum, frame: request_stop("SIGTERM"))
    # SIGUSR1 stays blocked here and in the workers, which inherit the mask, until train/loop/signals.py's
    # catch_early handles it: a stop request during a worker's start-up then waits for it instead of
    # killing it (the default action), and the worker stops after its first step. This agent takes its
    # own in a thread, and only then imports torch, which takes seconds.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    threading.Thread(target=forward_stop_requests, name="stop-requests", daemon=True).start()
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import determine_local_world_size, parse_args
    from torch.distributed.run import main as torchrun_main

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(not_a_stop)

    # Keep torchrun from replacing our SIGTERM handler (it installs its own when workers start). SIGINT
    # (Ctrl-C) stays torchrun's: it forwards SIGINT, which the workers take as a stop request, waits for
    # them (--shutdown-timeout), then raises SignalException; a second Ctrl-C reaches them as SIGTERM.
    args = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *sys.argv[1:]]
    endpoint = rendezvous_endpoint(args)
    if endpoint and ":" in endpoint:
        wait_for_rendezvous(endpoint, RDZV_WAIT_S)
    markers = Path(tempfile.mkdtemp(prefix="torchrun-stop-"))  # fresh for each attempt: no stale markers
    os.environ[STOP_MARKERS_ENV] = str(markers)  # the workers inherit it
    try:
        torchrun_main(args)
    except ChildFailedError as e:
        print("[slurm/torchrun] workers exited: " + ", ".join(f"rank {rank} with status {f.exitcode}"
              for rank, f in sorted(e.failures.items())), file=sys.stderr, flush=True)
        sys.exit(exit_status(markers, determine_local_world_size(parse_args(args).nproc_per_node), e.failures))
    except SignalException as e:  # torchrun got SIGINT, SIGHUP or SIGQUIT, passed it on and waited for the workers
        if e.sigval == signal.SIGINT:
            stop_requested.set()  # a Ctrl-C is a stop request: the workers' markers say whether each stopped
        sys.exit(exit_status(markers, determine_local_world_size(parse_args(args).nproc_per_node), {}))
    except RendezvousError as e:  # the node hosting the rendezvous store ended (its own error says why)
        print(f"[slurm/torchrun] {socket.gethostname()} lost the rendezvous at {endpoint} ({type(e).__name__}): "
              f"the node hosting it has ended; its error says why. Exiting 1", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        shutil.rmtree(markers, ignore_errors=True)


def record_status(status: int) -> None:
    """This node's exit status, as <NODE_STATUS_ENV folder>/<host>, for pretrain.sbatch."""
    folder = os.environ.get(NODE_STATUS_ENV)
    if not folder:
        return
    try:
        (Path(folder) / socket.gethostname()).write_text(f"{status}\n")
    except OSError as e:  # then the batch script judges from srun's status alone
        print(f"[slurm/torchrun] could not record this node's exit status in {folder}: {e}", file=sys.stderr)


if __name__ == "__main__":
    status = 1  # an exception other than SystemExit
    try:
        main()
        status = 0
    except SystemExit as end:
        status = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
        raise
    finally:
        record_status(status)
        gc.freeze()  # exit without the teardown's garbage collections over torch's objects (a second or so)
