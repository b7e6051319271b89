"""Stop on request: SIGTERM or SIGUSR1 (SLURM's preemption and time-limit warnings) or SIGINT (Ctrl-C)
ask the run to finish its current step, checkpoint, and exit with EXIT_STOPPED so the job can be requeued.
The trainer folds the flag into its one per-step all-reduce, so every rank stops after the same step.
A second Ctrl-C exits at once with EXIT_INTERRUPTED, as does a Ctrl-C during start-up (nothing to save yet).
A worker whose torchrun died (kill -9) ends too, within a second: see watch_launcher."""

import json
import os
import signal
import threading
import time
from pathlib import Path

from ..observe.logs import console_lost, note

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# launch/slurm/torchrun.py names a fresh folder here for each attempt; see mark_stopped.
STOP_MARKERS_ENV = "LLM_PRETRAIN_STOP_MARKERS"

_received: list[int] = []  # stop signals this process got (module state: catch_early's must reach the loop)
_held_term: list[int] = []  # a SIGTERM that came before the config was checked, see catch_early


def _handle(signum, frame) -> None:
    # A second Ctrl-C. torchrun starts its workers in sessions of their own, so a terminal's Ctrl-C reaches
    # a worker once, forwarded by torchrun as SIGINT; torchrun forwards a second one as SIGTERM.
    if signal.SIGINT in _received and signum in (signal.SIGINT, signal.SIGTERM):
        _exit_now("interrupted again: exiting at once, without the stop checkpoint (the run resumes from its "
                  "last complete checkpoint)")
    if signum == signal.SIGINT and not _received and os.environ.get("RANK", "0") == "0":
        _say(f"Ctrl-C: finishing this step, checkpointing and exiting with status {EXIT_STOPPED}; Ctrl-C again "
             "exits at once")
    _received.append(signum)  # only a flag: the loop acts on it between steps


def _interrupted_during_start_up(signum, frame) -> None:
    _exit_now("interrupted during start-up, before the first step: nothing to save, exiting")


def _say(line: str) -> None:
    """One write, safe in a signal handler (no buffered stream's lock); to the log file once stderr is gone."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError as e:  # `... | tee log` and Ctrl-C: tee ended too. Raised here, it would end the run
        console_lost(2, e)
        try:
            os.write(2, (line + "\n").encode())
        except OSError:
            pass


def _exit_now(message: str) -> None:
    """Exit with EXIT_INTERRUPTED after one line in the style of the entry points' errors; no unwinding,
    which could wait on a peer in a collective."""
    rank = os.environ.get("RANK")
    _say(f"error{'' if rank is None else f' (rank {rank})'}: {message}")
    os._exit(EXIT_INTERRUPTED)


def _hold_term(signum, frame) -> None:
    _held_term.append(signum)


def catch_early() -> None:
    """Catch SIGUSR1 from process start (launch/pretrain.py calls this first): SLURM's warning can
    land during start-up or resume, and its default action would kill the process; caught, the run
    stops after its first step. SIGINT (Ctrl-C) ends the process at once in one line, instead of a
    KeyboardInterrupt traceback. SIGTERM is held until the config is checked (release_term): when a
    config is bad every rank finds it, and torchrun SIGTERMs the others as soon as the first exits, which
    would otherwise cut a slower rank's line."""
    signal.signal(signal.SIGUSR1, _handle)
    signal.signal(signal.SIGINT, _interrupted_during_start_up)
    signal.signal(signal.SIGTERM, _hold_term)
    # launch/slurm/torchrun.py starts its workers with SIGUSR1 blocked, so that one sent before this
    # handler existed is still pending: unblocked, it reaches the handler now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def release_term() -> None:
    """SIGTERM's default again, from the end of the config check until the loop starts: a rank whose peer
    failed during start-up (it may be waiting for it in a collective) dies at once when torchrun sends
    SIGTERM. One held since catch_early acts now."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _held_term:
        signal.raise_signal(signal.SIGTERM)


class StopRequest:
    def __init__(self):
        for s in STOP_SIGNALS:
            signal.signal(s, _handle)
        self.asked_by: str | None = None  # who asked, when not a signal (a loop hook: see request)

    @property
    def signum(self) -> int | None:
        return _received[0] if _received else None

    def request(self, by: str) -> None:
        """Stop as a stop signal does, after the step under way (a loop hook's call: `by` names it in the log)."""
        self.asked_by = self.asked_by or by

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.asked_by is not None

    def why(self) -> str:
        """The log's words for the request: the signal, the hook that asked, or another rank (its vote)."""
        return signal.Signals(self.signum).name if self.signum else self.asked_by or "on another rank"


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


def watch_launcher() -> None:
    """Under torchrun, end this worker within a second of its launcher's death, with a line in its log saying
    why. torch's elastic agent starts each worker in a session of its own (setsid), so `kill -9` of torchrun's
    process group (a job that seems stuck, a test harness) would leave the workers training headless: holding
    the run folder's lock, writing checkpoints, holding their memory. No stop checkpoint: the peers may be gone
    too, or the job stuck in a collective; the run resumes from its last complete checkpoint."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # started by hand or by srun: its parent is no launcher
        return
    launcher = os.getppid()
    threading.Thread(target=_end_with, args=(launcher,), name="launcher-watch", daemon=True).start()


def _end_with(launcher: int) -> None:
    while os.getppid() == launcher:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(0.5)
    line = (f"the launcher (torchrun, pid {launcher}) is gone: exiting without a checkpoint; the same command "
            "resumes from the last complete one")
    if not note(line):  # no log file yet (start-up)
        _say(f"error (rank {os.environ.get('RANK', '0')}): {line}")
    os._exit(1)
