"""Logging of a run: every rank to `<run>/logs/rank<r>.log`, rank 0 also to the console.

A console that goes away never stops a run: when the reader of a pipe ends (`... 2>&1 | tee log` and Ctrl-C,
which ends tee too) or the terminal closes, the first write that fails points that stream at the rank's log
file, says so there in one line, and the run goes on to its stop checkpoint."""

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("train")

_log_file: list[Path] = []  # this rank's log file, once setup_logging has named it
_lost: set[int] = set()  # file descriptors (1, 2) whose reader went away


def setup_logging(run_dir: Path, rank: int) -> None:
    """Every rank logs to run_dir/logs/rank<r>.log; rank 0 also to the console."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    _log_file[:] = [run_dir / "logs" / f"rank{rank}.log"]
    guard_console()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(_log_file[0])]
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.addFilter(lambda record: 1 not in _lost)  # else each line would reach the log file twice
        handlers.append(console)
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    if _lost:
        log.warning("the console went away during start-up: this file alone has the run's log")
    # On a full disk every log write fails, ours and W&B's: without this each one prints a
    # "--- Logging error ---" traceback. The write that matters (a checkpoint) reports it in one line.
    logging.raiseExceptions = False


class _Console:
    """sys.stdout or sys.stderr as they were, but a write or flush that fails (the reader went away) moves the
    stream to the log file instead of raising into whatever was writing: a log line, W&B's summary, an error."""

    def __init__(self, stream, fd: int):
        self._stream, self._fd = stream, fd

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            console_lost(self._fd, e)
            if self._fd == 1:  # rank 0's log lines, which the log file has already: not a second copy
                return len(text)
            return self._retry(lambda: self._stream.write(text))

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            console_lost(self._fd, e)
            self._retry(self._stream.flush)

    @staticmethod
    def _retry(again):
        try:
            return again()
        except OSError:  # not even the log file takes it (a full disk): the text is lost, the run goes on
            return 0

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer, ...: the stream's own
        return getattr(self._stream, name)


def guard_console() -> None:
    """Wrap sys.stdout and sys.stderr in _Console (once). Started with one closed (`>&-`), it gets /dev/null:
    else the next file opened (a log, a checkpoint) would take its number and receive the console's text."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    if not isinstance(sys.stdout, _Console):
        sys.stdout = _Console(sys.stdout or open(1, "w", closefd=False), 1)  # None: started with fd 1 closed
    if not isinstance(sys.stderr, _Console):
        sys.stderr = _Console(sys.stderr or open(2, "w", closefd=False), 2)


def console_lost(fd: int, error: OSError) -> None:
    """Point fd (1: stdout, 2: stderr) at this rank's log file (/dev/null before there is one) after a write to
    it failed, with a line in that file saying so. Plain system calls only: the signal handlers call this."""
    if fd in _lost or isinstance(error, BlockingIOError):  # a full non-blocking terminal is still there
        return
    _lost.add(fd)
    name = "stdout" if fd == 1 else "stderr"
    try:
        target = os.open(_log_file[0] if _log_file else os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError:
        return
    note(f"{name} is gone ({error}): its output continues in this file, and the run goes on")
    os.dup2(target, fd)
    os.close(target)


def note(message: str) -> bool:
    """Append one line to this rank's log file (in the log's format) with plain system calls: no logging
    lock, which another thread or the code a signal interrupted may hold. False before setup_logging."""
    if not _log_file:
        return False
    line = f"{time.strftime('%H:%M:%S')} [rank{os.environ.get('RANK', '0')}] {message}\n"
    try:
        fd = os.open(_log_file[0], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        return False
    return True
