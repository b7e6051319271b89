"""Checkpoints through the real entry point: DCP on disk, resumes bit-exact and across world sizes,
SIGKILL in the middle of a write, retention, and refusing an incompatible resume."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import TINY, children, env, ledger, losses, pretrain, pretrain_cmd, tiny_data

B = 4  # global batch (sequences per step)
# Warmup covers the first 4 steps, so a run stopped at step 4 used the same learning rates as an
# 8-step run: resuming it with steps=8 must reproduce the 8-step run exactly.
BASE = [*TINY, f"global_batch_size={B}", "optim.warmup_steps=4", "checkpoint.save_final=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """The uninterrupted reference: 8 steps on 2 ranks."""
    run = tmp_path_factory.mktemp("straight") / "run"
    pretrain(2, run, *BASE, *data, "steps=8", "micro_batch_size=2")
    return run


@pytest.fixture(scope="module")
def half(tmp_path_factory, data) -> Path:
    """The first 4 of those steps, checkpointed at the end."""
    run = tmp_path_factory.mktemp("half") / "run"
    pretrain(2, run, *BASE, *data, "steps=4", "micro_batch_size=2")
    return run


def assert_ledger_complete(run: Path, steps: int):
    """Every global sample of steps 1..steps consumed exactly once, in the stream's order."""
    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, steps + 1))
    flat = [s for step in sorted(consumed) for s in consumed[step]]
    assert flat == list(range(steps * B))  # no gap, no repeat


def test_resume_is_bit_exact(straight, half, tmp_path, data):
    run = tmp_path / "run"
    shutil.copytree(half, run)
    proc = pretrain(2, run, *BASE, *data, "steps=8", "micro_batch_size=2")
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert losses(run) == losses(straight)  # exact: same losses, same samples
    assert_ledger_complete(run, 8)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(straight, half, tmp_path, data, before, after):
    run = tmp_path / "run"
    if before == 2:
        shutil.copytree(half, run)
    else:
        pretrain(1, run, *BASE, *data, "steps=4", "micro_batch_size=4")
    pretrain(after, run, *BASE, *data, "steps=8", f"micro_batch_size={B // after}")
    assert_ledger_complete(run, 8)
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5)  # DCP resharded model and optimizer


def test_sigkill_during_checkpoint_write_resumes_from_previous(straight, tmp_path, data):
    run = tmp_path / "run"
    args = [*BASE, *data, "steps=8", "micro_batch_size=2", "checkpoint.interval=2", "checkpoint.keep_last=2",
            "checkpoint.keep_every=4"]
    proc = subprocess.Popen(pretrain_cmd(2, run, *args), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed_at = None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        partial = list((run / "checkpoints").glob(".tmp-step_*")) if (run / "checkpoints").is_dir() else []
        # Kill a rank while a later checkpoint is being written (an earlier one is complete).
        if partial and partial[0].name > ".tmp-step_00000002":
            workers = children(proc.pid)
            if workers:
                os.kill(max(workers), signal.SIGKILL)
                killed_at = partial[0].name
                break
        time.sleep(0.005)
    proc.communicate(timeout=120)
    if killed_at is None:
        pytest.skip("the run finished before a checkpoint write could be caught (machine too fast)")
    assert proc.returncode != 0
    finished = pretrain(2, run, *args)
    assert "resumed from" in finished.stdout
    assert losses(run) == losses(straight)
    assert_ledger_complete(run, 8)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    # keep_last=2 keeps steps 6 and 8; keep_every=4 keeps step 4 as well.
    assert kept == ["step_00000004", "step_00000006", "step_00000008"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_stop_signal_checkpoints_and_exits_distinctly(straight, tmp_path, data):
    run = tmp_path / "run"
    args = [*BASE, *data, "steps=8", "micro_batch_size=2"]
    proc = subprocess.Popen(pretrain_cmd(2, run, *args), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(losses(run)) >= 2:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGUSR1)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    stopped_at = max(losses(run))
    assert stopped_at < 8, "the signal came too late to test stopping"
    assert proc.returncode != 0 and "stop requested" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    pretrain(2, run, *args)
    assert losses(run) == losses(straight)
    assert_ledger_complete(run, 8)


def test_resume_from_an_explicit_step(straight, tmp_path, data):
    run = tmp_path / "run"
    pretrain(2, run, *BASE, *data, "steps=4", "micro_batch_size=2", "checkpoint.interval=2")
    # Resume from step 2 although step 4 is the latest: steps 3-8 are redone and match the straight run.
    proc = pretrain(2, run, *BASE, *data, "steps=8", "micro_batch_size=2", "checkpoint.resume=2")
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    assert losses(run) == losses(straight)


def test_incompatible_resume_is_refused(half, tmp_path, data):
    run = tmp_path / "run"
    shutil.copytree(half, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = pretrain(2, run, *BASE, *data, "steps=8", "micro_batch_size=2", "model.dim=96", check=False)
    assert proc.returncode != 0
    assert "model.dim was 64 and is now 96" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched


def test_async_save_resumes_bit_exact(straight, tmp_path, data):
    run = tmp_path / "run"
    args = [*BASE, *data, "micro_batch_size=2", "checkpoint.async_save=true", "checkpoint.interval=2"]
    pretrain(2, run, *args, "steps=4")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    pretrain(2, run, *args, "steps=8")
    assert losses(run) == losses(straight)
    assert_ledger_complete(run, 8)
