"""Faults through the real entry point: random SIGKILLs (tests/support/fault_inject.py, a short run of it),
torchrun restarting the workers after a rank dies, a dead rank's peers ending in one line, and a hung
rank ending the job after collective_timeout_s instead of hanging forever."""

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SUPPORT,
    TINY,
    children,
    env,
    ledger,
    losses,
    pretrain,
    pretrain_cmd,
    tiny_data,
    without_torchrun_summary,
    workers,
)

B = 4
BASE = [*TINY, f"global_batch_size={B}", "micro_batch_size=2", "steps=12", "checkpoint.interval=2",
        "checkpoint.save_final=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def test_random_kills_resume_from_complete_checkpoints(tmp_path, data):
    """A short run of the fault injector (the full one: `python tests/support/fault_inject.py --trials 20`): one kill
    in each phase (start-up, step, loader, checkpoint write), on the session's tiny data."""
    data_folder = Path(data[1].split("=", 1)[1]).parent  # data.tokenizer=<folder>/tok.model
    proc = subprocess.run([sys.executable, str(SUPPORT / "fault_inject.py"), "--trials", "4", "--seed", "7",
                           "--workdir", str(tmp_path), "--data", str(data_folder)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    summary = re.search(r"trials \(kills\) (\d+) .* kills by phase (\{.*?\}), .* resumes (\d+), .* mismatches (\d+)",
                        proc.stdout)
    assert summary, proc.stdout[-3000:] + proc.stderr[-3000:]
    kills, by_phase, resumes, mismatches = summary.groups()
    assert proc.returncode == 0 and mismatches == "0", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert kills == "4" and int(resumes) >= 1
    assert ast.literal_eval(by_phase) == {"startup": 1, "step": 1, "loader": 1, "checkpoint": 1}, by_phase


def test_torchrun_restarts_a_dead_rank_from_the_latest_checkpoint(tmp_path, data):
    straight = tmp_path / "straight"
    pretrain(2, straight, *BASE, *data)
    run = tmp_path / "run"
    cmd = pretrain_cmd(2, run, *BASE, *data)
    cmd.insert(cmd.index("--standalone"), "--max-restarts=2")  # torchrun restarts the workers itself
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not killed:
        latest = run / "checkpoints" / "latest"
        # Once a checkpoint exists, and before the run ends, kill rank 1 mid-run.
        if latest.is_file() and latest.read_text().strip() < "step_00000012":
            pid = workers(proc.pid).get(1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=300)
    if not killed:
        pytest.skip("the run finished before a rank could be killed (machine too fast)")
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out  # the restarted workers found the checkpoint without help
    assert losses(run) == losses(straight)
    consumed = ledger(run)
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(12 * B))


def stop_rank_1(proc: subprocess.Popen, run: Path, when: str, sig: int = signal.SIGSTOP) -> tuple[int, float]:
    """SIGSTOP rank 1 (alive but silent: its peers wait in a collective) at start-up, as soon as it exists, so
    rank 0 waits for it to join, or in training after 2 steps; returns its pid and when it stopped. Another
    sig (SIGKILL) is sent the same way."""
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if when == "start-up" or ((run / "metrics.jsonl").is_file() and len(losses(run)) >= 2):
            stopped = workers(proc.pid).get(1)
            if stopped:
                os.kill(stopped, sig)
                return stopped, time.time()
        time.sleep(0.02)
    raise AssertionError("rank 1 could not be found")


def stderr_until_exit(proc: subprocess.Popen, stopped: int, t_stop: float) -> tuple[str, float | None]:
    """The job's stderr to its end, and the seconds from the stop to the first error line (None: no error line).
    Once that line is out the stopped rank is killed: torchrun would give it 30 s of grace first."""
    err, took = "", None
    for line in proc.stderr:
        err += line
        if took is None and line.startswith("error (rank"):
            took = time.time() - t_stop
            os.kill(stopped, signal.SIGKILL)
    proc.wait()
    return err, took


@pytest.mark.parametrize("when", ["start-up", "training"])
def test_a_hung_rank_ends_the_job_after_the_collective_timeout(when, tmp_path, data):
    timeout_s = 10
    run = tmp_path / "run"
    args = [*BASE, *data, "steps=100000", "checkpoint.interval=0", f"collective_timeout_s={timeout_s}"]
    proc = subprocess.Popen(pretrain_cmd(2, run, *args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stopped = None

    def kill_job():  # a job that never times out must still end the test (its workers hold stderr open)
        for pid in [*children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)

    watchdog = threading.Timer(300, kill_job)
    watchdog.start()
    try:
        stopped, t_stop = stop_rank_1(proc, run, when)
        err, took = stderr_until_exit(proc, stopped, t_stop)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        if stopped and Path(f"/proc/{stopped}").exists():
            os.kill(stopped, signal.SIGKILL)
    assert_one_line_timeout(err, when, run, timeout_s)
    assert proc.returncode != 0
    assert took is not None and took < timeout_s + 30, took  # the timeout, plus start-up when the peer hangs early


def assert_one_line_timeout(err: str, when: str, run: Path, timeout_s: int) -> None:
    """The live rank reports the timeout in one line naming itself, where it waited and for how long."""
    found = re.search(r"error \(rank (\d)\): collective timed out (during start-up|at step (\d+)) on rank (\d) "
                      r"after (\d+) s", err)
    assert found, err[-4000:]
    rank, where, step, rank_again, after = found.groups()
    assert rank == rank_again == "0" and int(after) == timeout_s
    if when == "start-up":
        assert where == "during start-up" and not (run / "metrics.jsonl").exists()
    else:
        # The step being worked on: after the last logged one (or the one whose log line it waited on).
        last_step = max(losses(run))
        assert step is not None and last_step <= int(step) <= last_step + 2
    summary = err.find("ChildFailedError")  # torchrun's own traceback and summary come last
    assert "Traceback" not in err[: err.rfind("Traceback", 0, summary)]  # ours: one line, no traceback


def test_a_dead_rank_ends_its_peer_in_one_line(tmp_path, data):
    """SIGKILL of rank 1 in training: its peer's next collective fails at once (the socket closes); it says in
    one line which peer it lost and at which step, with no traceback."""
    run = tmp_path / "run"
    args = [*BASE, *data, "steps=100000", "checkpoint.interval=0"]
    proc = subprocess.Popen(pretrain_cmd(2, run, *args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        stop_rank_1(proc, run, "training", signal.SIGKILL)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:  # a survivor that hangs instead must not outlive the test
            for pid in [*children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    # It names the rank it lost and that rank's host, from the peer address in gloo's error.
    found = re.search(r"^error \(rank 0\): rank 0 lost rank 1 on \S+ \([0-9.]+\) at step (\d+) \(its process died",
                      err, re.MULTILINE)
    assert found, err[-4000:]
    last_step = max(losses(run))  # the step being worked on: after the last logged one
    assert last_step <= int(found.group(1)) <= last_step + 2
    assert "Traceback" not in without_torchrun_summary(err), err[-4000:]


def test_an_error_on_one_rank_ends_its_peer_at_once(tmp_path, data):
    """Rank 1 alone fails in training (its sample ledger is /dev/full: no space, at step 1). It exits without
    waiting for its peer, which waits for it in the step's all-reduce: rank 0 fails at once naming rank 1,
    rather than after collective_timeout_s, and the error of rank 1 is in the log."""
    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    (run / "ledger" / "rank1.jsonl").symlink_to("/dev/full")
    proc = subprocess.run(pretrain_cmd(2, run, *BASE, *data, "collective_timeout_s=60", "checkpoint.interval=0"),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    err = without_torchrun_summary(proc.stderr)
    assert proc.returncode != 0 and "Traceback" not in err, err[-4000:]
    assert f"error (rank 1): no space left on {run}/ledger while writing rank1.jsonl (No space left on device)" \
        in err, err[-4000:]
    assert re.search(r"^error \(rank 0\): rank 0 lost rank 1 on \S+ \([0-9.]+\) at step 1 ", err, re.MULTILINE), \
        err[-4000:]
