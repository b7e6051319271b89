"""Pipeline parallelism through the real entry point on gloo (torch.distributed.pipelining's stages and
schedules): 10-step fp32 loss curves and validation losses, document-masked, equal to one rank's for pp2 with
1F1B, pp2 interleaved (2 stages per rank) x dp_shard2 and pp2 x tp2; the sample's head at one position; resumes
pp2 -> pp1 and pp1 -> pp2 with the loader exact; a rollback and a stop under pp2; HF export from a pipelined
run; the layouts a pipeline cannot take."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SUPPORT, TINY, env, free_port, ledger, losses, pretrain, sample_of, tiny_data, tiny_paragraphs
from safetensors.torch import load_file

from train.interop.hf_export import export_hf

B, STEPS = 4, 10
# 4 blocks (2 stages per rank need them), an untied head (it sits on the last stage, the embedding on the
# first); the warmup is as long as the run, so a resumed half sees the same learning rates. 3 validation
# micro-batches: not a whole number of pipeline steps (2 micro-batches each), so the last step is padded.
BASE = [*TINY, "model.n_layers=4", "model.tie_embeddings=false", f"global_batch_size={B}", f"steps={STEPS}",
        "optim.warmup_steps=10", "checkpoint.interval=5", "checkpoint.save_final=true", "data.seq_len=32",
        "sample_prompt=Thou", "sample_tokens=8", "val_batches=3"]

# name -> (processes, layout); "n1" is the one-rank reference, with 2 accumulation steps of 2 sequences.
LAYOUTS = {
    "n1": (1, ["micro_batch_size=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "micro_batch_size=2"]),
    # Interleaved1F1B (4 stages of 1 block, 2 per rank) over 2 data-parallel pipelines.
    "pp2_interleaved_dp_shard2": (4, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "micro_batch_size=1"]),
    "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2", "micro_batch_size=2"]),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shared runs' data: paragraphs, masked from each other, their positions carried to every stage."""
    return [*tiny_paragraphs(tmp_path_factory), "data.document_masking=true"]


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Runs shared by several tests, each started once: name -> run folder."""
    root, done = tmp_path_factory.mktemp("pp_runs"), set()

    def get(name: str) -> Path:
        nproc, layout = LAYOUTS[name]
        if name not in done:
            pretrain(nproc, root / name, *BASE, *data, *layout, torchrun=nproc > 1)
            done.add(name)
        return root / name

    return get


def curve(run: Path) -> list[float]:
    return [loss for _, loss in sorted(losses(run).items())]


def val_losses(run: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def assert_ledger_complete(run: Path):
    """Every global sample of the 10 steps consumed exactly once, in the stream's order, though every
    stage of a pipeline reads the same batch."""
    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, STEPS + 1))
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(STEPS * B))


@pytest.mark.parametrize("name, stages", [
    ("pp2_1f1b", "stage 0"), ("pp2_interleaved_dp_shard2", "stage 0, 2"), ("pp2_tp2", "stage 0"),
])
def test_pp_layouts_match_one_rank(runs, name, stages):
    reference, run = curve(runs("n1")), runs(name)
    assert len(reference) == STEPS and reference[-1] < reference[0]  # it trains
    assert curve(run) == pytest.approx(reference, abs=1e-5)
    assert val_losses(run) == pytest.approx(val_losses(runs("n1")), abs=1e-5) and val_losses(run)
    assert_ledger_complete(run)
    log = (run / "logs" / "rank0.log").read_text()
    assert f"this rank holds {stages}\n" in log and "pp 2" in log
    assert sample_of(run) == sample_of(runs("n1"))  # generated through the pipeline's stages


@pytest.mark.parametrize("source, nproc, layout", [
    ("pp2_1f1b", 1, ["micro_batch_size=2"]),  # pp2 -> pp1
    # pp1 -> pp2 with the zero-bubble V schedule: 4 stages, rank 0 holding the first and the last (and the
    # loss); no validation or sample, which torch cannot run under ZBV (refused, see below).
    ("n1", 2, ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "micro_batch_size=1", "val_batches=0",
               "sample_prompt=''"]),
])
def test_resume_across_pp(runs, tmp_path, data, source, nproc, layout):
    """A copy of run `source` resumed from its step-5 checkpoint at another layout, to step 10."""
    run = tmp_path / "run"
    shutil.copytree(runs(source), run)
    proc = pretrain(nproc, run, *BASE, *data, "checkpoint.resume=5", *layout, torchrun=nproc > 1)
    assert "resumed from" in proc.stdout and "step_00000005" in proc.stdout
    assert curve(run) == pytest.approx(curve(runs("n1")), abs=1e-5)  # DCP put every stage's tensors in place
    assert_ledger_complete(run)


def worker_lines(n: int, *args: str) -> list[dict]:
    """pp_sample_worker.py on n plain processes meeting at a free port (3 s sooner than torchrun's agent): each
    rank's JSON line."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "pp_sample_worker.py"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(n)]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:  # the other ranks, when one timed out
            proc.kill()
    failed = [f"rank {r}: {err[-3000:]}" for r, (proc, (_, err)) in enumerate(zip(procs, outputs)) if proc.returncode]
    assert not failed, "\n".join(failed)
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


def test_the_sample_and_lm_eval_scores_apply_the_head_where_read_only():
    """The end-of-run sample under pp2 (pp_sample_worker.py): every micro-batch's output of the last stage is
    the logits of one position of each row, not (rows, T, V), and they equal the whole model's on both ranks.
    lm-eval's windows go a step's four rows at a time: the head reads the span of positions they score, and the
    log-probabilities and greedy flags equal the whole model's on both ranks; its greedy requests' windows, three at
    once, each read at its own end, equal the whole model's logits after each window alone."""
    ranks = worker_lines(2)
    assert [r["shape"] for r in ranks] == [[1, 512], [1, 512]]
    assert all(r["diff"] < 1e-5 for r in ranks), ranks
    assert ranks[0]["last_stage_outputs"] == []  # rank 0 holds the first stage
    # One per micro-batch of the step (2), after the stage's first run infers its shapes with a forward.
    assert ranks[1]["last_stage_outputs"][-2:] == [[2, 1, 512]] * 2
    assert all(shape == [2, 1, 512] for shape in ranks[1]["last_stage_outputs"])
    assert [r["scores"] for r in ranks] == [7, 7] and all(r["scores_diff"] < 1e-5 for r in ranks), ranks
    # Windows of 11, 32, 5, 24 tokens scoring their last 3, 5, 1, 4 (positions 4 to 31), then of 29, 8, 19 scoring
    # 2, 8, 1 (positions 0 to 28): two micro-batches of two rows each step.
    assert ranks[0]["score_outputs"] == [] and \
        ranks[1]["score_outputs"] == [[2, 28, 512], [2, 28, 512], [2, 29, 512], [2, 29, 512]]
    assert all(r["ends_diff"] < 1e-5 for r in ranks), ranks
    assert ranks[1]["ends_outputs"] == [[2, 1, 512]] * 2


def test_greedy_windows_under_cp_read_each_end_where_it_is_held():
    """pp2 x cp2 on 4 ranks: the sample's window and lm-eval's greedy windows (their ends held by either cp rank)
    give the whole model's next-token logits on every rank, and its scored windows its log-probabilities."""
    ranks = worker_lines(4, "cp")
    assert all(r["diff"] < 1e-5 and r["scores_diff"] < 1e-5 and r["ends_diff"] < 1e-5 for r in ranks), ranks


def test_hf_export_from_pp(runs, tmp_path, data):
    """A pp2 checkpoint exports to the same Hugging Face weights as the one-rank run's (equal to 1e-5)."""
    tokenizer = next(a.split("=", 1)[1] for a in data if a.startswith("data.tokenizer="))
    exported = [load_file(export_hf(runs(name) / "checkpoints" / "step_00000010", tmp_path / name,
                                    tokenizer_path=tokenizer) / "model.safetensors") for name in ("n1", "pp2_1f1b")]
    assert sorted(exported[0]) == sorted(exported[1]) and "lm_head.weight" in exported[1]
    for key, tensor in exported[0].items():
        assert exported[1][key].float() == pytest.approx(tensor.float(), abs=1e-5), key


def test_rollback_and_stop_under_pp(tmp_path, plays):
    """Random tokens at step 10 make a spike, rolled back to the step-6 checkpoint with its samples skipped;
    a stop at step 12 checkpoints every stage and exits with the stop status."""
    run = tmp_path / "run"
    proc = pretrain(2, run, *BASE, *plays, "parallel.pp=2", "parallel.pp_schedule=GPipe", "micro_batch_size=2",
                    "steps=14", "checkpoint.interval=6",
                    # steps 7-9 as the history: the random tokens' loss (about ln 512) stands 4 of their
                    # deviations above it, where the deviations of 6-9 would put it at the threshold
                    "stability.min_history=3", "stability.window=3", "stability.spike_z=3",
                    check=False, drills={"spike_data_steps": [10], "stop_at_step": 12})
    assert proc.returncode != 0, proc.stdout[-3000:]  # plain torchrun exits 1 when its workers exit 75
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert "checkpointing at step 12 and exiting with status 75" in log, log[-3000:]
    assert "rolled back to step_00000006 (step 6); skipped samples [24, 40)" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    consumed = ledger(run)
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(24)) + list(range(40, 40 + 6 * B))


@pytest.mark.parametrize("changes, message", [
    ({"n_layers": 3, "pp_schedule": "Interleaved1F1B"}, "pp=2 x pp_virtual_stages=2 stages exceed model.n_layers=3"),
    ({"micro_batch_size": 4}, r"= 4 / \(4 x 1\) = 1 micro-batches per step, fewer than pp=2, which 1F1B needs"),
    ({"tie_embeddings": True}, "parallel.pp needs an untied head"),
    ({"pp_schedule": "InterleavedZeroBubble", "compile": True}, "set parallel.compile=false"),
    ({"pp_layers_per_stage": [1, 2]}, r"parallel.pp_layers_per_stage=\[1, 2\] must give 2 stages"),
    ({"pp_schedule": "ZBVZeroBubble", "val_batches": 2},
     "ZBVZeroBubble cannot run validation, the sample or eval.tasks"),
])
def test_layouts_a_pipeline_cannot_take_are_refused(changes, message):
    from model import ModelConfig
    from train.config import BatchShape, TrainConfig
    from train.parallel.pipeline import check_pipeline

    cfg = TrainConfig(global_batch_size=4, micro_batch_size=changes.get("micro_batch_size", 2),
                      val_batches=changes.get("val_batches", 0))
    cfg.parallel.pp, cfg.parallel.compile = 2, changes.get("compile", False)
    cfg.parallel.pp_schedule = changes.get("pp_schedule", "1F1B")
    cfg.parallel.pp_layers_per_stage = changes.get("pp_layers_per_stage")
    model = ModelConfig(dim=64, n_layers=changes.get("n_layers", 4), n_heads=4, n_kv_heads=2, vocab_size=512,
                        tie_embeddings=changes.get("tie_embeddings", False))
    with pytest.raises(ValueError, match=message):
        check_pipeline(cfg.parallel, model, BatchShape(cfg.micro_batch_size, cfg.global_batch_size, cfg.data.seq_len),
                       dp_size=1, evaluates=cfg.val_batches > 0 or bool(cfg.sample_prompt))


@pytest.mark.parametrize("schedule, micro_batch_size, global_batch_size, settings", [
    ("1F1B", 4, 4, [{"micro_batch_size": 2}, {"global_batch_size": 8}]),  # 1 micro-batch: 1F1B needs pp
    ("Interleaved1F1B", 2, 10, [{"micro_batch_size": 1}, {"global_batch_size": 12}]),  # 5: not in rounds of 5 // 2
])
def test_a_micro_batch_count_a_schedule_refuses_is_refused_with_settings_that_work(schedule, micro_batch_size,
                                                                                   global_batch_size, settings):
    """The pipeline's micro-batches per step are global_batch_size / (micro_batch_size x data-parallel ranks), set
    through those keys alone (parallel.pp_microbatches, which could only repeat that number, is gone): a count the
    schedule refuses names a micro_batch_size and a global_batch_size that give one it takes, and both pass."""
    import re
    from dataclasses import replace

    from model import ModelConfig
    from train.config import BatchShape, TrainConfig, check_overrides
    from train.parallel.pipeline import check_pipeline

    model = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, tie_embeddings=False)

    def check(cfg: TrainConfig) -> None:
        check_pipeline(cfg.parallel, model, BatchShape(cfg.micro_batch_size, cfg.global_batch_size, cfg.data.seq_len),
                       dp_size=1, evaluates=cfg.val_batches > 0 or bool(cfg.sample_prompt))

    cfg = TrainConfig(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, val_batches=0)
    cfg.parallel.pp, cfg.parallel.pp_schedule = 2, schedule
    cfg.check(world_size=2)
    with pytest.raises(ValueError, match=f"parallel.pp_schedule={schedule}: ") as refused:
        check(cfg)
    proposed = re.search(r"; set (?:micro_batch_size=(\d+) or )?global_batch_size=(\d+) ", str(refused.value))
    assert proposed, refused.value
    assert [{"micro_batch_size": int(proposed[1])}, {"global_batch_size": int(proposed[2])}] == settings
    for setting in settings:
        fixed = replace(cfg, **setting)
        fixed.check(world_size=2)
        check(fixed)
    assert check_overrides(["parallel.pp_microbatches=2"], REPO / "conf").startswith(
        "parallel.pp_microbatches was removed: a pipeline runs global_batch_size / (micro_batch_size x data-parallel "
        "ranks) micro-batches per step; set micro_batch_size or global_batch_size")
