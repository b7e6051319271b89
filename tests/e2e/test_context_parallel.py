"""Context parallelism (parallel.cp) through the real entry point on gloo: short fp32 loss curves equal to one rank's
for cp2 (with and without document masking), cp2 x dp_shard2, cp2 x tp2 and cp2 x pp2, on paragraphs whose
documents cross the chunks the cp ranks hold; resumes cp2 -> cp1 and cp1 -> cp2 with the loader continuing exactly;
a layout cp cannot split refused at start-up. The step's gradients and each rank's mask are checked in
tests/train/parallel/."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, ledger, losses, pretrain, sample_of, tiny_paragraphs, without_torchrun_summary

from data_pipeline.loader import TokenLoader
from data_pipeline.shardset import ShardSet

B, STEPS, T = 4, 6, 32
# fp32 on the CPU; the warmup is as long as the run, so a resumed half sees the same learning rates. T = 32 in 4
# chunks of 8 under cp=2: rank 0 holds window positions 0-7 and 24-31, rank 1 positions 8-23.
BASE = [*TINY, f"global_batch_size={B}", f"steps={STEPS}", f"optim.warmup_steps={STEPS}", "checkpoint.interval=3",
        f"data.seq_len={T}", "sample_prompt=Thou", "sample_tokens=8"]
MASKED, PLAIN = "data.document_masking=true", "data.document_masking=false"

# name -> (processes, overrides); n1_* are the one-rank references.
LAYOUTS = {
    "n1_masked": (1, [MASKED, f"micro_batch_size={B}"]),
    "n1_plain": (1, [PLAIN, f"micro_batch_size={B}"]),
    # The same micro-batches as the references (validation reads val_batches x micro_batch_size x data-parallel
    # ranks windows); accumulation under CP is in the cp1 -> cp2 resume below and in tests/support/cp_worker.py.
    "cp2_masked": (2, [MASKED, "parallel.cp=2", f"micro_batch_size={B}"]),
    "cp2_plain": (2, [PLAIN, "parallel.cp=2", f"micro_batch_size={B}"]),
    # 4 ranks are slow on 2 cores: the two 4-rank layouts run with document masking only.
    "cp2_dp_shard2": (4, [MASKED, "parallel.cp=2", "micro_batch_size=2"]),
    "cp2_tp2": (4, [MASKED, "parallel.cp=2", "parallel.tp=2", f"micro_batch_size={B}"]),
    # 1F1B over 2 stages of 1 block, 2 micro-batches a step; validation (val_batches x micro_batch_size windows) and
    # the sample through the schedule, each stage masking and gathering K/V with its cp peer's same stage.
    "cp2_pp2": (4, [MASKED, "parallel.cp=2", "parallel.pp=2", "micro_batch_size=2", "val_batches=4"]),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_paragraphs(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Runs shared by several tests, each started once: name -> run folder."""
    root = tmp_path_factory.mktemp("cp_runs")
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            nproc, layout = LAYOUTS[name]
            pretrain(nproc, root / name, *BASE, *data, *layout, torchrun=nproc > 1)
            cache[name] = root / name
        return cache[name]

    return get


def curve(run: Path) -> list[float]:
    return [loss for _, loss in sorted(losses(run).items())]


def validation(run: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def assert_ledger_complete(run: Path):
    """Every global sample of the run consumed exactly once, in the stream's order, though the ranks of a CP group
    read the same batch."""
    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, STEPS + 1))
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(STEPS * B))


def test_the_windows_hold_documents_cut_between_the_cp_ranks(data):
    """The runs' windows (global samples 0 to STEPS x B - 1, seed 0) hold document starts, and documents that
    start in one rank's chunk and go on into the other rank's: the mask and the K/V gathers are exercised."""
    shards = next(o.split("=", 1)[1] for o in data if o.startswith("data.shards="))[1:-1]
    loader = TokenLoader(ShardSet.open(shards), seq_len=T, global_batch_size=B, seed=0, return_positions=True)
    positions = loader.samples(np.arange(STEPS * B))["position_ids"]
    assert (positions[:, 1:] == 0).any(dim=1).sum() >= B  # windows that pack more than one document
    for cut in (8, 24):  # rank 0's chunk | rank 1's, and rank 1's | rank 0's
        started_inside = (positions[:, cut] > 0) & (positions[:, cut] < cut)  # crosses the cut, begun in the window
        assert started_inside.any(), f"no document crosses window position {cut}"


@pytest.mark.parametrize("name, reference", [("cp2_masked", "n1_masked"), ("cp2_plain", "n1_plain"),
                                             ("cp2_dp_shard2", "n1_masked"), ("cp2_tp2", "n1_masked"),
                                             ("cp2_pp2", "n1_masked")])
def test_cp_layouts_match_one_rank(runs, name, reference):
    one, run = runs(reference), runs(name)
    assert len(curve(one)) == STEPS and curve(one)[-1] < curve(one)[0]  # it trains
    assert curve(run) == pytest.approx(curve(one), abs=1e-5)
    assert validation(run) == pytest.approx(validation(one), abs=1e-5) and validation(run)
    assert sample_of(run) == sample_of(one)  # generated from whole windows, as without CP
    assert_ledger_complete(run)
    assert " cp 2" in (run / "logs" / "rank0.log").read_text()


def test_document_masking_acts_under_cp(runs):
    """The masked cp2 run equals the masked one-rank run (above) and differs from the unmasked one: dropping the
    document mask under CP would not go unseen."""
    masked, plain = curve(runs("cp2_masked")), curve(runs("cp2_plain"))
    assert max(abs(a - b) for a, b in zip(masked, plain)) > 1e-3


@pytest.mark.parametrize("source, nproc, layout", [
    ("cp2_masked", 1, [f"micro_batch_size={B}"]),  # cp2 -> cp1
    ("n1_masked", 2, ["parallel.cp=2", "micro_batch_size=1"]),  # cp1 -> cp2, with 4 accumulation steps
])
def test_resume_across_cp(runs, tmp_path, data, source, nproc, layout):
    """A copy of run `source` resumed from its step-3 checkpoint with another parallel.cp, to the end."""
    run = tmp_path / "run"
    shutil.copytree(runs(source), run)
    proc = pretrain(nproc, run, *BASE, *data, MASKED, "checkpoint.resume=3", *layout, torchrun=nproc > 1)
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    assert curve(run) == pytest.approx(curve(runs("n1_masked")), abs=1e-5)  # DCP resharded model and optimizer
    assert_ledger_complete(run)


def test_a_world_cp_does_not_divide_is_refused_in_one_line(tmp_path, data):
    proc = pretrain(1, tmp_path / "run", *BASE, *data, "parallel.cp=2", check=False, torchrun=False)
    err = without_torchrun_summary(proc.stderr)
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and "parallel.cp=2" in lines[0] and "must divide the world size 1" in lines[0], err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
