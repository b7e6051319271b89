"""One job per run folder: two jobs with the same run_name would overwrite each other's checkpoints,
metrics and ledgers. The job holds an exclusive lock on run_dir/.lock for its life, and a second job
fails at start-up in one line naming the holder.

The lock is flock(2), which the kernel drops when the holding process ends however it ends (SIGKILL,
the OOM killer, SLURM's kill at the time limit), so a requeued or restarted job is never locked out by
its previous attempt. A plain lock file created with O_EXCL would not do: a killed job leaves it behind
and every later attempt is refused until someone deletes it by hand. flock works on local disks and on
NFSv4 (Linux turns it into a whole-file lock the server holds; if the holder's node dies rather than
the process, the server drops it when the client's lease lapses, about 90 s). Lustre needs the `flock`
mount option, else flock fails with ENOSYS: that is LockUnsupported below.

Two cautions for the holding process. On NFS the lock is a POSIX lock, which the process loses when it
closes ANY descriptor of the file: never open run_dir/.lock elsewhere in it. And a child forked without
exec shares the descriptor and keeps the lock alive after its parent dies; exec'd children (torchrun
workers, compile workers) do not get it: the descriptor is close-on-exec, Python's default.
"""

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunInUse(OSError):
    """Another live process holds the run folder's lock."""


class LockUnsupported(OSError):
    """The run folder's file system cannot flock (e.g. Lustre mounted without the `flock` option)."""


class RunLock:
    """An exclusive lock on a run folder; take it with RunLock.acquire(run_dir)."""

    def __init__(self, path: Path, fd: int, holder: dict):
        self.path = path  # run_dir/.lock
        self.holder = holder  # what this process wrote into it: host, pid, slurm_job_id, since
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock run_dir (created if missing) for this process's life, without waiting; raises RunInUse
        (one line naming the folder and the holder) when another process holds it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_RDWR: NFS grants an exclusive lock only then
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInUse(f"{run_dir} is in use by another job ({_describe(holder)}): wait for it to end or "
                           "stop it, or pick another run_name") from None
        except OSError as e:
            os.close(fd)
            raise LockUnsupported(f"cannot lock {path} ({e.strerror}): put the run folder on a file system "
                                  "with flock (a local disk, NFSv4, Lustre mounted with -o flock)") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)  # so a job on another NFS client reads the holder, not an empty file
        return cls(path, fd, holder)

    def release(self) -> None:
        """Unlock (closing the descriptor drops the lock); a second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    """The holder's JSON line, or None while it has not written it yet (it writes right after locking)."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _describe(holder: dict | None) -> str:
    if not isinstance(holder, dict):
        return "holder not yet named in the lock file"
    job = holder.get("slurm_job_id")
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}" + (f", SLURM job {job}" if job else "")
            + f", since {holder.get('since', '?')}")
