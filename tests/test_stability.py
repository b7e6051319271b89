"""Non-finite losses and loss spikes, injected into real runs: skipped updates and rollbacks."""

import json
import math

import pytest

from helpers import TINY, ledger, pretrain, tiny_data

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
    proc = pretrain(2, run, *BASE, *data, "faults.nan_loss_steps=[3]")
    assert "step 3: loss nan" in proc.stdout and "update skipped (non-finite" in proc.stdout
    rows = [r for r in records(run) if "loss" in r]
    assert rows[-1]["skipped_steps"] == 1 and rows[-1]["rollbacks"] == 0
    assert math.isnan(rows[2]["loss"])  # logged as it was
    later = [r["loss"] for r in rows[3:]]
    assert all(math.isfinite(x) for x in later) and later[-1] < rows[1]["loss"]  # weights not corrupted
    assert math.isfinite(records(run)[-1]["val_loss"])


def test_repeated_nan_rolls_back_and_skips_the_data(tmp_path, data):
    run = tmp_path / "run"
    proc = pretrain(2, run, *BASE, *data, "faults.nan_loss_steps=[7,8,9]", "stability.max_non_finite_in_a_row=3")
    assert "rolled back to step_00000006 (step 6); skipped samples [24, 36)" in proc.stdout
    consumed = ledger(run)
    flat = [s for step in sorted(consumed) for s in consumed[step]]
    # Steps 1-6 read samples 0-23; after the rollback steps 7-14 read from sample 36 on.
    assert flat == list(range(24)) + list(range(36, 36 + 8 * B))
    assert max(r["step"] for r in records(run) if "loss" in r) == 14


def test_loss_spike_rolls_back(tmp_path, data):
    run = tmp_path / "run"
    proc = pretrain(2, run, *BASE, *data, "faults.spike_data_steps=[10]")
    assert "update skipped (loss spike" in proc.stdout
    assert "rolled back to step_00000006 (step 6); skipped samples [24, 40)" in proc.stdout
    rollback = [r for r in records(run) if "rollback_to_step" in r]
    assert rollback == [{"step": 6, "rollback_to_step": 6, "skipped_samples_start": 24, "skipped_samples_end": 40}]
    assert max(r["step"] for r in records(run) if "loss" in r) == 14


def test_spike_detection_off_keeps_training(tmp_path, data):
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data, "micro_batch_size=4", "faults.spike_data_steps=[10]", "stability.spike_z=0")
    assert "rolled back" not in proc.stdout
    assert [r for r in records(run) if "loss" in r][-1]["skipped_steps"] == 0
