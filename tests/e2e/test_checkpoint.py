"""Checkpoints through the real entry point: DCP on disk, resumes bit-exact and across world sizes,
SIGKILL in the middle of a write, retention, and refusing an incompatible resume."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TINY, children, env, ledger, losses, pretrain, pretrain_cmd, tiny_data, workers

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
    """The first 4 of those steps, checkpointed at steps 2 and 4 (the end)."""
    run = tmp_path_factory.mktemp("half") / "run"
    pretrain(2, run, *BASE, *data, "steps=4", "micro_batch_size=2", "checkpoint.interval=2")
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


def test_resume_on_another_world_size(straight, tmp_path, data):
    """One process's checkpoint resumed on 2 ranks (2 -> 1, sharded to one process, is
    tests/e2e/test_tensor_parallel.py's tp2 -> tp1 resume)."""
    run = tmp_path / "run"
    pretrain(1, run, *BASE, *data, "steps=4", f"micro_batch_size={B}", torchrun=False)
    pretrain(2, run, *BASE, *data, "steps=8", f"micro_batch_size={B // 2}")
    assert_ledger_complete(run, 8)
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5)  # DCP resharded model and optimizer


def test_steps_redone_on_fewer_ranks_are_counted_once(straight, half, tmp_path, data):
    """2 ranks went to step 4; one process resumes from step 2. Rank 1 no longer exists to rewrite its steps
    3-4, so the resumed run removes them from its file: the ledger stays exactly-once."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    proc = pretrain(1, run, *BASE, *data, "steps=8", f"micro_batch_size={B}", "checkpoint.resume=2", torchrun=False)
    assert "step_00000002 at step 2" in proc.stdout
    assert sorted(json.loads(line)["step"] for line in (run / "ledger" / "rank1.jsonl").read_text().splitlines()) \
        == [1, 2]
    assert_ledger_complete(run, 8)
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5)


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


def test_resume_from_an_explicit_step(straight, half, tmp_path, data):
    run = tmp_path / "run"
    shutil.copytree(half, run)
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


def test_an_async_save_written_before_a_crash_is_resumed_from(tmp_path, data):
    """Killed (SIGKILL) after the background write of step 2 finished and before the next save: the restart
    completes that checkpoint and resumes from it (it deleted it, losing two intervals). The final background
    save is in place before the final validation runs."""
    run = tmp_path / "run"
    args = [*BASE, *data, "steps=4", "micro_batch_size=4", "checkpoint.async_save=true", "checkpoint.interval=2"]
    crashed = pretrain(1, run, *args, check=False, torchrun=False, drills={"crash_after_steps": 3})
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-3000:]
    proc = pretrain(1, run, *args, torchrun=False)
    out = proc.stdout
    assert "completing checkpoint" in out and "step_00000002 at step 2" in out, out[-3000:]
    assert_ledger_complete(run, 4)
    assert 0 <= out.find("step_00000004 written in the background") < out.find("step 4: validation loss"), out[-3000:]


def test_checkpoints_come_before_validation_and_a_stop_saves_once(tmp_path, data):
    """A due checkpoint never waits for validation (which can fail, or be slow at a preemption); a stop
    request on a step that is also a checkpoint step writes that checkpoint once (it was written twice,
    the second time removing the first before its replacement was in place)."""
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data, "steps=8", "micro_batch_size=4", "checkpoint.interval=2", "val_interval=2",
                    check=False, torchrun=False, drills={"stop_at_step": 4})
    out = proc.stdout
    assert proc.returncode != 0 and "stop requested" in out, out[-3000:]
    saved, validated = out.find("step_00000002 saved"), out.find("step 2: validation loss")
    assert 0 <= saved < validated, out[-3000:]
    assert out.count("step_00000004 saved") == 1, out[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_a_save_interrupted_between_its_renames_is_completed(straight, half, tmp_path, data):
    """Killed while re-saving a step: the earlier save of that step set aside, the new one written in
    full but not renamed yet, `latest` naming the step. The restart must put the new one in place and
    resume from it (it used to delete the complete new one and, with nothing else kept, start over)."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_00000002")  # the re-saved step is the only checkpoint
    shutil.copytree(ckpts / "step_00000004", ckpts / ".tmp-step_00000004")
    os.replace(ckpts / "step_00000004", ckpts / ".replaced-step_00000004")
    proc = pretrain(2, run, *BASE, *data, "steps=8", "micro_batch_size=2")
    assert "completing checkpoint" in proc.stdout and "step_00000004 at step 4" in proc.stdout, proc.stdout[-3000:]
    assert losses(run) == losses(straight)
    assert not list(ckpts.glob(".*step_*"))


@pytest.fixture(scope="module")
def second_set(tmp_path_factory, data) -> Path:
    """Another real shard set (one more play, no validation split) for the same tokenizer."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import Tokenizer

    play = sorted(sample_corpus_dir().glob("*.txt"))[6]
    tok = Tokenizer(data[1].split("=", 1)[1])
    return build_shards([str(play)], tmp_path_factory.mktemp("second") / "set", tok, val_fraction=0.0, num_proc=1,
                        progress=False).parent


def test_changed_data_is_refused_unless_allowed(half, second_set, tmp_path, data):
    run = tmp_path / "run"
    shutil.copytree(half, run)
    first = data[2].split("=", 1)[1].strip("[]")
    more = [*BASE, *data[:2], f"data.shards=[{first},{second_set}]", "steps=8", "micro_batch_size=4"]
    refused = pretrain(1, run, *more, check=False, torchrun=False)
    assert refused.returncode != 0 and "data.shards changed since the checkpoint" in refused.stderr
    assert "data.allow_change=true" in refused.stderr and max(losses(run)) == 4
    allowed = pretrain(1, run, *more, "data.allow_change=true", torchrun=False)
    assert "data mixture changed at global sample 16" in allowed.stdout, allowed.stdout[-3000:]
    assert max(losses(run)) == 8
    before = ledger(run)
    # The first set continues its own order: none of its windows of steps 1-4 comes again in 5-8.
    assert not {s for step in (1, 2, 3, 4) for s in before[step]} & {s for step in (5, 6, 7, 8) for s in before[step]}


def test_a_second_job_on_the_same_run_folder_is_refused(tmp_path, data):
    """Two jobs with one run_name would delete each other's checkpoints: the second stops at start-up
    naming the folder and the first job, and the first goes on untouched."""
    run = tmp_path / "run"
    first = subprocess.Popen(pretrain_cmd(1, run, *BASE, *data, "steps=100000", "micro_batch_size=4"), cwd=tmp_path,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while first.poll() is None and not ((run / "metrics.jsonl").is_file() and losses(run)):
            assert time.time() < deadline
            time.sleep(0.1)
        second = pretrain(2, run, *BASE, *data, "steps=4", "micro_batch_size=2", check=False)
        assert second.returncode != 0
        err = second.stderr
        assert f"error (rank 0): {run} is in use by another job (host" in err and "pid" in err, err[-2000:]
        assert "error (rank 1): rank 0 could not lock" in err, err[-2000:]
        assert first.poll() is None  # still training
    finally:
        for pid in workers(first.pid).values():
            os.kill(pid, signal.SIGUSR1)  # stop it cleanly: checkpoint and exit
        out, _ = first.communicate(timeout=300)
    assert "stop requested" in out and (run / "checkpoints" / "latest").is_file()


def test_user_copies_in_the_checkpoint_folder_are_left_alone(half, tmp_path, data):
    """Only folders named as the trainer names them are checkpoints: a user's `step_00000004_keep` copy
    survives retention, and a renamed `step_00000009.bak` is neither resumed from nor a crash."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_00000002")  # retention then has only the run's own new checkpoints to remove
    for name in ("step_00000004_keep", "step_00000009.bak"):
        shutil.copytree(ckpts / "step_00000004", ckpts / name)
    (ckpts / "latest").unlink()  # resume by scanning: .bak has the highest number
    proc = pretrain(1, run, *BASE, *data, "steps=8", "micro_batch_size=4", "checkpoint.interval=2",
                    "checkpoint.keep_last=1", torchrun=False)
    assert "step_00000004 at step 4" in proc.stdout, proc.stdout[-3000:]
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "step_00000004_keep", "step_00000008", "step_00000009.bak"], names
    assert "removing checkpoint" in proc.stdout and "step_00000006 (checkpoint.keep_last=1)" in proc.stdout


def test_a_fresh_start_in_a_used_folder_is_refused_or_moves_the_old_run_aside(half, tmp_path, data):
    """checkpoint.resume=none where another run's checkpoints are: refused in one line, nothing touched (it
    started over, deleted that run's ledger and later let retention and the fallback mix both runs'
    checkpoints); with checkpoint.overwrite=true the old run's checkpoints, ledger and metrics are moved aside
    and the folder holds only the new run's."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    def records():
        return {p: p.read_bytes() for p in (*(run / "checkpoints").rglob("*"), *(run / "ledger").rglob("*"),
                                            run / "metrics.jsonl") if p.is_file()}

    before = records()
    args = [*BASE, *data, "steps=2", "micro_batch_size=4", "checkpoint.resume=none"]
    refused = pretrain(1, run, *args, check=False, torchrun=False)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
    assert "holds 2 checkpoint(s), the newest step_00000004, of an earlier run; starting afresh there would mix " \
           "two runs' checkpoints" in refused.stderr, refused.stderr
    assert "new run_name" in refused.stderr and "checkpoint.overwrite=true" in refused.stderr
    assert records() == before
    proc = pretrain(1, run, *args, "checkpoint.overwrite=true", torchrun=False)
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1
    assert f"moved the earlier run's checkpoints, ledger, metrics.jsonl to {aside[0]}" in proc.stdout
    assert sorted(p.name for p in (aside[0] / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert sorted(ledger(run)) == [1, 2] and sorted(losses(run)) == [1, 2]


def test_a_diverging_learning_rate_ends_in_bounded_rollbacks(half, tmp_path, data):
    """optim.lr=1e10 from step 5 on, a checkpoint at every step: step 5's loss is finite (the weights after its
    update are not), steps 6-8 are not. No checkpoint is written from a non-finite step; the rollback to
    step 5 gives non-finite losses at once, so step 5 is passed over for step 4; after
    stability.max_rollbacks=3 rollbacks to step 4 the run stops in one line naming the learning rate. (It
    saved the non-finite weights and rolled back to them for ever.)"""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    proc = pretrain(1, run, *BASE, *data, "steps=12", "micro_batch_size=4", "checkpoint.interval=1", "optim.lr=1e10",
                    check=False, torchrun=False, timeout=180)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "rolled back to step_00000004 3 times and the loss still turns non-finite (stability.max_rollbacks=3)" \
        in proc.stderr and "likely cause is the learning rate (optim.lr=1e+10" in proc.stderr, proc.stderr
    assert "step 6: no checkpoint written: the last 1 step(s) gave a non-finite loss" in proc.stdout
    assert "step_00000005 gave non-finite losses straight after the rollback to it: passing it over" in proc.stdout
    assert [r["to_step"] for r in json.loads((run / "checkpoints" / "rollbacks.json").read_text())] == [5, 4, 4, 4]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]


def test_a_resume_at_or_past_steps_says_so(half, tmp_path, data):
    """Resumed at step 4 with steps=2: refused in one line (it trained nothing and exited 0); with steps=4: says
    there is nothing to train and how to start a new run instead (a re-run of the finished demo ended with no hint),
    and logs no save (it logged one that did not happen)."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    past = pretrain(1, run, *BASE, *data, "steps=2", "micro_batch_size=4", check=False, torchrun=False)
    assert past.returncode == 1 and "steps=2: " in past.stderr and "is at step 4, the run is already past steps" \
        in past.stderr and past.stderr.count("\n") == 1, past.stderr[-3000:]
    done = pretrain(1, run, *BASE, *data, "steps=4", "micro_batch_size=4", torchrun=False).stdout
    assert "the run is already at steps=4: nothing to train" in done and " saved; " not in done, done[-3000:]
    hint = next(line for line in done.splitlines() if "already at steps=4" in line)
    # the keys that start over (test_a_fresh_start_in_a_used_folder_is_refused_or_moves_the_old_run_aside runs them)
    assert "run_name=" in hint and "checkpoint.resume=none checkpoint.overwrite=true" in hint, hint


def test_resume_from_a_run_folder_takes_its_newest_checkpoint(half, tmp_path, data):
    """checkpoint.resume=<run folder>, as launch/eval.py takes it (it was refused as "not a complete checkpoint")."""
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data, "steps=5", "micro_batch_size=4", f"checkpoint.resume={half}", torchrun=False)
    assert f"resumed from {half}/checkpoints/step_00000004 at step 4" in proc.stdout, proc.stdout[-3000:]
    assert sorted(losses(run)) == [5]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(half, tmp_path, data):
    """A garbage `latest` and a truncated train_state.json in the newest step: the resume warns and uses
    the newest readable checkpoint instead of failing (or starting over)."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    ckpts = run / "checkpoints"
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00garbage")
    state = ckpts / "step_00000004" / "train_state.json"
    state.write_text(state.read_text()[:200])
    proc = pretrain(1, run, *BASE, *data, "steps=6", "micro_batch_size=4", "checkpoint.interval=2", torchrun=False)
    assert "which is missing or damaged; using step_00000002" in proc.stdout, proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout


def test_no_validation_split_means_no_validation_metric(second_set, tmp_path, data):
    """A shard set built without a validation split: one warning, no val_loss (it used to log 0.0)."""
    run = tmp_path / "run"
    proc = pretrain(1, run, *BASE, *data[:2], f"data.shards=[{second_set}]", "steps=2", "micro_batch_size=4",
                    "val_interval=1", torchrun=False)
    assert "no shard set has a validation split" in proc.stdout
    assert not [line for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]


def test_optimizer_settings_given_on_a_resume_apply_from_that_step(half, tmp_path, data):
    """lr, schedule, weight decay and betas given on a resume take effect at the resumed step: the
    learning rate follows the new schedule at that step (it kept the old peak and was distorted), and
    the new weight decay and beta2 change the update (they were ignored)."""
    from train.config import OptimSection
    from train.optim import lr_at

    plain, changed = tmp_path / "plain", tmp_path / "changed"
    shutil.copytree(half, plain)
    shutil.copytree(half, changed)
    new = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.9, beta2=0.5)
    schedule = [f"optim.lr={new.lr}", f"optim.min_lr={new.min_lr}", f"optim.warmup_steps={new.warmup_steps}"]
    pretrain(1, plain, *BASE, *data, "steps=8", "micro_batch_size=4", *schedule, torchrun=False)
    out = pretrain(1, changed, *BASE, *data, "steps=8", "micro_batch_size=4", *schedule,
                   f"optim.weight_decay={new.weight_decay}", f"optim.beta2={new.beta2}", torchrun=False).stdout
    assert "optim.lr: 0.003 -> 0.001 from step 5" in out and "optim.beta2: 0.95 -> 0.5 from step 5" in out
    assert "optim.warmup_steps=10 is longer than the run (steps=8)" in out
    rows = {json.loads(line)["step"]: json.loads(line) for line in (changed / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line}
    # The lr a step's row reports is the one the next step uses: step s's row shows lr_at(s) (0-based).
    assert [rows[s]["lr"] for s in (5, 6, 7)] == pytest.approx([lr_at(s, 8, new) for s in (5, 6, 7)], rel=1e-6)
    assert losses(changed)[5] == losses(plain)[5] and losses(changed)[6] != losses(plain)[6]  # step 5's update


def test_a_start_reads_the_ledger_from_its_end_only(tmp_path):
    """Removing the records after the start step reads a 20,000-step ledger from its end, as far as that step
    (it read and parsed the whole file at every start: 235 MiB and 3 s at 20k steps of a real run); lines
    crossing the 64 KiB pieces it reads come out whole, and a torn last line stays for open_to_append."""
    from train.observe.jsonl import drop_records_after

    def bytes_read() -> int:
        return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

    path = tmp_path / "rank0.jsonl"
    rows = [json.dumps({"step": s, "samples": list(range(16 * s, 16 * s + 16))}) + "\n" for s in range(1, 20_001)]
    torn = '{"step": 20001, "sam'
    path.write_text("".join(rows) + torn)
    before = bytes_read()
    assert drop_records_after(path, 19_990) == 10
    assert bytes_read() - before < 256 * 1024, "read more than the end of the 3 MB file"
    assert path.read_text() == "".join(rows[:19_990]) + torn
    assert drop_records_after(path, 1_000) == 18_990 and path.read_text() == "".join(rows[:1_000]) + torn


def test_a_line_torn_by_a_failed_write_is_cut_off_on_resume(straight, half, tmp_path, data):
    """A full disk can stop a metrics or ledger line halfway; the resumed run removes that line rather than
    run the next record into it: every line of both files parses, and the run equals the straight one."""
    run = tmp_path / "run"
    shutil.copytree(half, run)
    torn = ['{"step": 5, "loss": 4.2', '{"step": 5, "samp']
    for file, tail in ((run / "metrics.jsonl", torn[0]), (run / "ledger" / "rank1.jsonl", torn[1])):
        with open(file, "a") as f:
            f.write(tail)
    proc = pretrain(2, run, *BASE, *data, "steps=8", "micro_batch_size=2")
    assert f"{run}/metrics.jsonl: removed a last line torn by a write that failed ({len(torn[0])} bytes)" \
        in proc.stdout, proc.stdout[-3000:]
    for file in (run / "metrics.jsonl", *(run / "ledger").glob("rank*.jsonl")):
        for line in file.read_text().splitlines():
            json.loads(line)  # a torn line run into the next record would not parse
    assert losses(run) == losses(straight)
    assert_ledger_complete(run, 8)
