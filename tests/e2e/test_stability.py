"""Non-finite losses and loss spikes, injected into real runs: skipped updates and rollbacks."""

import json
import math
import random

import pytest
from helpers import TINY, ledger, pretrain, tiny_data

from train.config import StabilitySection
from train.state.stability import StabilityMonitor, Verdict

B = 4
BASE = [*TINY, f"global_batch_size={B}", "micro_batch_size=2", "steps=14", "checkpoint.interval=6",
        "stability.min_history=4", "stability.window=4", "stability.spike_z=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_skips_the_update(tmp_path, data):
    run = tmp_path / "run"
    proc = pretrain(2, run, *BASE, *data, drills={"nan_loss_steps": [3]})
    assert "step 3: loss nan" in proc.stdout and "update skipped (non-finite" in proc.stdout
    rows = [r for r in records(run) if "loss" in r]
    assert rows[-1]["skipped_steps"] == 1 and rows[-1]["rollbacks"] == 0
    assert math.isnan(rows[2]["loss"])  # logged as it was
    later = [r["loss"] for r in rows[3:]]
    assert all(math.isfinite(x) for x in later) and later[-1] < rows[1]["loss"]  # weights not corrupted
    assert math.isfinite(records(run)[-1]["val_loss"])


def test_repeated_nan_rolls_back_and_skips_the_data(tmp_path, data):
    run = tmp_path / "run"
    proc = pretrain(2, run, *BASE, *data, "stability.max_non_finite_in_a_row=3", drills={"nan_loss_steps": [7, 8, 9]})
    assert "rolled back to step_00000006 (step 6); skipped samples [24, 36)" in proc.stdout
    consumed = ledger(run)
    flat = [s for step in sorted(consumed) for s in consumed[step]]
    # Steps 1-6 read samples 0-23; after the rollback steps 7-14 read from sample 36 on.
    assert flat == list(range(24)) + list(range(36, 36 + 8 * B))
    assert max(r["step"] for r in records(run) if "loss" in r) == 14


def test_non_finite_losses_with_no_checkpoint_stop_the_run(tmp_path, data):
    """No checkpoint to roll back to and the loss stays non-finite: after stability.max_rollbacks rollback
    verdicts that could not be served the run stops in one line (it went on skipping every update to the end)."""
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data, "micro_batch_size=4", "steps=8", "checkpoint.interval=0",
                    check=False, torchrun=False, drills={"nan_loss_steps": [2, 3, 4, 5, 6, 7]})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "step 6: 5 non-finite losses in a row and no rollback possible (no checkpoint yet) " \
           "(stability.max_rollbacks=3); the run stops" in proc.stderr, proc.stderr
    assert max(ledger(run)) == 6  # the last step read


@pytest.fixture(scope="module")
def spiked(tmp_path_factory, data):
    """A run whose step 10 sees random tokens: a spike, rolled back to step 6 (returns the run and its stdout)."""
    run = tmp_path_factory.mktemp("spiked") / "run"
    return run, pretrain(2, run, *BASE, *data, drills={"spike_data_steps": [10]}).stdout


def test_loss_spike_rolls_back(spiked):
    run, stdout = spiked
    assert "update skipped (loss spike" in stdout
    assert "rolled back to step_00000006 (step 6); skipped samples [24, 40)" in stdout
    rollback = [r for r in records(run) if "rollback_to_step" in r]
    assert rollback == [{"step": 6, "rollback_to_step": 6, "skipped_samples_start": 24, "skipped_samples_end": 40}]
    assert max(r["step"] for r in records(run) if "loss" in r) == 14
    for f in (run / "ledger").glob("rank*.jsonl"):  # the rollback removed the steps it undid: still in step order
        assert [json.loads(line)["step"] for line in f.read_text().splitlines()] == list(range(1, 15))


def final_rows(run) -> dict[int, dict]:
    """Training figures by step that do not depend on timing; a re-done step keeps its last values."""
    keep = ("loss", "lr", "grad_norm", "tokens_seen", "skipped_steps", "rollbacks")
    return {r["step"]: {k: r[k] for k in keep} for r in records(run) if "loss" in r}


def test_crash_after_a_rollback_resumes_as_if_it_had_not_crashed(spiked, tmp_path, data):
    """The rollback is recorded on disk: a job killed after it and before the next checkpoint resumes
    from the same checkpoint, skips the same samples and trains on exactly as the job that did not
    crash. Equal losses, learning rates and gradient norms after a fresh load from disk also show that
    the in-process rollback restored model, optimizer and schedule to the checkpoint exactly."""
    reference, _ = spiked
    run = tmp_path / "run"
    # Steps 1-10 (the spike at 10 rolls back to 6), then 7 and 8 again: killed after 12 steps, before
    # step 8 is logged and long before the next checkpoint (12).
    crashed = pretrain(2, run, *BASE, *data, check=False, drills={"spike_data_steps": [10], "crash_after_steps": 12})
    assert crashed.returncode != 0 and "rolled back to step_00000006" in crashed.stdout
    assert [r["step"] for r in records(run) if "loss" in r][-2:] == [9, 7]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    again = pretrain(2, run, *BASE, *data)
    assert "skipping samples [24, 40) again" in again.stdout
    consumed = ledger(run)
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(24)) + list(range(40, 40 + 8 * B))
    assert final_rows(run) == final_rows(reference)


def test_a_lasting_loss_shift_is_admitted_when_no_rollback_happens():
    """With no rollback possible, a loss that moves to a new level for good (100 steps around 3.0,
    then 3.1 for ever) is flagged stability.spike_patience times, then accepted."""
    cfg = StabilitySection(spike_z=6.0, window=100, min_history=20, min_std=0.01, spike_patience=5)
    monitor, noise = StabilityMonitor(cfg), random.Random(0)
    before = [monitor.verdict(3.0 + noise.uniform(-0.005, 0.005), finite=True) for _ in range(100)]
    after = [monitor.verdict(3.1 + noise.uniform(-0.005, 0.005), finite=True) for _ in range(1000)]
    assert set(before) == {Verdict.OK}
    assert after[: cfg.spike_patience - 1] == [Verdict.ROLLBACK] * (cfg.spike_patience - 1)
    assert set(after[cfg.spike_patience - 1:]) == {Verdict.OK}
    assert monitor.verdict(4.0, finite=True) is Verdict.ROLLBACK  # a real spike above the new level still counts


def test_spike_detection_off_keeps_training(tmp_path, data):
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data, "micro_batch_size=4", "stability.spike_z=0", torchrun=False,
                    drills={"spike_data_steps": [10]})
    assert "rolled back" not in proc.stdout
    assert [r for r in records(run) if "loss" in r][-1]["skipped_steps"] == 0
