"""train/state/run_lock.py with real processes: a second job on a held run folder is refused in one line naming the
holder; the kernel frees the lock when the holder dies, even by SIGKILL, and exec'd children do not keep it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from helpers import REPO

from train.state.run_lock import RunInUse, RunLock

# Holds the lock on argv[1], says so, then runs argv[2:] (if any) as a child that keeps every inheritable
# descriptor, and sleeps until killed.
HOLDER = """
import subprocess, sys, time
from pathlib import Path
from train.state.run_lock import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
child = subprocess.Popen(sys.argv[2:], close_fds=False) if sys.argv[2:] else None
print("locked", child.pid if child else "", flush=True)
time.sleep(600)
"""


def hold(run_dir, *child_cmd, **env) -> tuple[subprocess.Popen, str]:
    """Start a process holding run_dir's lock; returns it and the rest of its 'locked' line."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), *child_cmd], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("locked"), f"the holder did not lock: {line!r}"
    return proc, line.removeprefix("locked").strip()


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_second_job_is_refused_naming_the_holder_until_it_is_killed(tmp_path):
    run = tmp_path / "run"
    holder, _ = hold(run, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(RunInUse) as refused:
            RunLock.acquire(run)
        message = str(refused.value)
        assert "\n" not in message
        pattern = (rf"{re.escape(str(run))} is in use by another job \(host {re.escape(socket.gethostname())}, "
                   rf"pid {holder.pid}, SLURM job 4242, since \d{{4}}-\d\d-\d\dT[^)]+\): wait for it to end or "
                   r"stop it, or pick another run_name")
        assert re.fullmatch(pattern, message), message
        assert isinstance(refused.value, OSError)  # the entry points turn OSError into one line
    finally:
        kill(holder)
    # SIGKILL gave the holder no chance to clean up; the kernel dropped its lock all the same.
    with RunLock.acquire(run) as lock:
        written = json.loads((run / ".lock").read_text())
        assert written == lock.holder and written["pid"] == os.getpid() and written["host"] == socket.gethostname()
        assert written["slurm_job_id"] == os.environ.get("SLURM_JOB_ID")
    # Released on leaving the block: another process takes it.
    holder, _ = hold(run)
    kill(holder)


def test_a_child_the_holder_exec_d_does_not_keep_the_lock(tmp_path):
    run = tmp_path / "run"
    holder, child_pid = hold(run, "sleep", "600")  # the child keeps every inheritable descriptor
    try:
        kill(holder)
        assert os.path.exists(f"/proc/{child_pid}"), "the child ended with its parent: nothing tested"
        RunLock.acquire(run).release()
    finally:
        os.kill(int(child_pid), signal.SIGKILL)
