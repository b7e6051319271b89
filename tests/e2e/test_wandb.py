"""W&B offline through the real entry point: steps re-done after a resume from an older checkpoint or a
rollback are in W&B's history as they are in metrics.jsonl, read back from the `.wandb` files themselves;
a W&B that cannot start does not stop training."""

import json
import subprocess
from pathlib import Path

import pytest
from helpers import TINY, env, pretrain, pretrain_cmd, tiny_data, wandb_history

BASE = [*TINY, "global_batch_size=4", "micro_batch_size=4", "wandb.mode=offline", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> list[str]:
    """(step, loss) of the training records, as JSON text so that a NaN loss equals itself."""
    return [json.dumps([r["step"], r["loss"]]) for r in rows if "loss" in r]


def assert_wandb_has_every_record(run: Path, train_steps: list[int]) -> None:
    """W&B's history is metrics.jsonl row for row: every record (training, validation, checkpoint,
    rollback) in the same order, each at a W&B step above the last, so the server keeps all of them."""
    written, logged = records(run), wandb_history(run)
    assert [r["step"] for r in written if "loss" in r] == train_steps
    assert losses(logged) == losses(written)
    wandb_steps = [r["_step"] for r in logged]
    assert wandb_steps == sorted(set(wandb_steps)), wandb_steps  # strictly increasing over all folders
    canonical = [json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, sort_keys=True) for r in logged]
    assert canonical == [json.dumps(r, sort_keys=True) for r in written]  # json.dumps: NaN equals NaN


def test_steps_redone_after_resuming_an_older_checkpoint_are_in_wandb(tmp_path, data):
    """4 steps, then the same run again from the step-2 checkpoint to step 6: W&B's step must not go
    back in the resumed run's new offline folder, and steps 3 and 4 are in its history twice."""
    run = tmp_path / "run"
    pretrain(1, run, *BASE, *data, "steps=4", torchrun=False)
    proc = pretrain(1, run, *BASE, *data, "steps=6", "checkpoint.resume=2", torchrun=False)
    assert "step_00000002 at step 2" in proc.stdout
    folders = list((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1, folders  # one run id
    # W&B's own lines (its ~34-line history and summary panel at the end) stay off the console; one line of ours
    # says where the resumed run's folder is and how to upload it.
    assert not [line for line in proc.stderr.splitlines() if line.startswith("wandb:")], proc.stderr[-3000:]
    assert f"saved offline: `wandb sync {max(folders)}` uploads it" in proc.stdout
    assert_wandb_has_every_record(run, [1, 2, 3, 4, 3, 4, 5, 6])


def test_steps_redone_after_a_rollback_are_in_wandb(tmp_path, data):
    """Non-finite losses at steps 3 and 4 roll the run back to the step-2 checkpoint within one process:
    step 3 (its NaN loss), the rollback record at step 2, and steps 3 and 4 again are all in W&B."""
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data, "steps=4", "stability.max_non_finite_in_a_row=2", torchrun=False,
                    drills={"nan_loss_steps": [3, 4]})
    assert "rolled back to step_00000002 (step 2)" in proc.stdout
    assert_wandb_has_every_record(run, [1, 2, 3, 3, 4])


def test_wandb_that_cannot_start_does_not_stop_training(tmp_path, data):
    """wandb.mode=online with no API key anywhere: W&B refuses to start (a real wandb.init error), the run
    warns and trains on, with every record in metrics.jsonl."""
    run = tmp_path / "run"
    no_key = {k: v for k, v in env().items() if k != "WANDB_API_KEY"} | {"NETRC": str(tmp_path / "no.netrc")}
    proc = subprocess.run(pretrain_cmd(1, run, *BASE, *data, "steps=2", "wandb.mode=online"), cwd=tmp_path,
                          env=no_key, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B did not start" in (run / "logs" / "rank0.log").read_text()
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2]
