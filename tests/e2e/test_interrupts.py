"""Ctrl-C on one process (`python launch/pretrain.py`, a world of one): during start-up it exits at once in
one line (there is nothing to save yet); in training the first asks for the stop checkpoint (see
tests/e2e/test_stop_status.py) and a second one exits at once, status 130, in one line. No KeyboardInterrupt
traceback either way. (torchrun turns a second Ctrl-C into SIGTERM for its workers: the same exit.)
SIGTERM while the config is read waits for the check: a bad config is still reported in its line (torchrun
SIGTERMs every rank as soon as the first one exits), a good one ends there. A console that went away (`... 2>&1 |
tee log`: Ctrl-C ends tee too) does not keep the first Ctrl-C from its stop checkpoint."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, losses, tiny_data, wandb_history

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell shows for Ctrl-C; not imported, so a changed constant fails here
# 64 accumulation steps make a step last about a second here, so the second Ctrl-C (0.1 s after the first)
# lands inside a step; after the stop checkpoint the interpreter's shutdown restores SIGINT's default action.
ARGS = [*TINY, "global_batch_size=256", "micro_batch_size=4", "steps=500", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def start(run: Path, data: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "+conf=debug", f"hydra.run.dir={run}", *ARGS, *data]
    return subprocess.Popen(cmd, cwd=run.parent, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, ready) -> None:
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "not ready after 300 s"
        time.sleep(0.02)


def assert_exited_in_one_line(proc: subprocess.Popen, text: str) -> None:
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and text in errors[0], out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def test_ctrl_c_during_start_up_exits_at_once(tmp_path, data):
    run = tmp_path / "run"
    proc = start(run, data)
    wait_for(proc, run.is_dir)  # Hydra made the run folder: past launch/pretrain.py's first lines, before a step
    proc.send_signal(signal.SIGINT)
    assert_exited_in_one_line(proc, "interrupted during start-up")
    assert not (run / "metrics.jsonl").exists(), "a step ran before the signal: not a start-up test"


def test_a_second_ctrl_c_exits_at_once(tmp_path, data):
    run = tmp_path / "run"
    proc = start(run, data)
    wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and losses(run))
    proc.send_signal(signal.SIGINT)  # finish the step, checkpoint, exit 75 ...
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # ... no: now
    assert_exited_in_one_line(proc, "interrupted again: exiting at once")


def handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler for signum (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def sigterm_at_process_start(run: Path, *args: str) -> tuple[subprocess.Popen, str]:
    proc = start(run, list(args))
    wait_for(proc, lambda: handles(proc.pid, signal.SIGUSR1))  # train/loop/signals.py's catch_early ran: the first line
    assert not run.is_dir(), "Hydra had already made the run folder: the config was read before the signal"
    proc.send_signal(signal.SIGTERM)
    return proc, proc.communicate(timeout=60)[0]


def test_sigterm_while_the_config_is_read_still_reports_a_bad_value(tmp_path, data):
    proc, out = sigterm_at_process_start(tmp_path / "run", *data, "optim.lr=-1")
    assert proc.returncode == 1, out[-3000:]
    assert [ln for ln in out.splitlines() if ln.startswith("error")] == [
        "error: optim.lr=-1.0 must be > 0"], out[-3000:]


def test_sigterm_while_the_config_is_read_ends_a_good_run_before_its_first_step(tmp_path, data):
    run = tmp_path / "run"
    proc, out = sigterm_at_process_start(run, *data)
    assert proc.returncode == -signal.SIGTERM, out[-3000:]
    assert not (run / "metrics.jsonl").exists(), out[-3000:]


def test_ctrl_c_after_the_console_went_away_still_stops_with_a_checkpoint(tmp_path, data):
    """`pretrain ... 2>&1 | tee log` and Ctrl-C: the terminal's SIGINT ends tee as well, so every later write to
    stdout or stderr fails (EPIPE). The run still checkpoints, exits 75, and its log file takes what the console
    would have shown; W&B (offline) is finished properly."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "+conf=debug", f"hydra.run.dir={run}", *TINY,
           "global_batch_size=4", "micro_batch_size=2", "steps=500", "checkpoint.interval=0", "wandb.mode=offline",
           *data]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and losses(run))
    proc.stdout.close()  # tee ended: the pipe has no reader
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 75, (run / "logs" / "rank0.log").read_text()[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    stopped_at = max(losses(run))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}", log[-3000:]
    assert "stderr is gone ([Errno 32] Broken pipe)" in log and "Ctrl-C: finishing this step" in log, log[-3000:]
    assert "W&B finish failed" not in log, log[-3000:]
    assert any(row["step"] == stopped_at and "checkpoint_blocked_s" in row for row in wandb_history(run))
