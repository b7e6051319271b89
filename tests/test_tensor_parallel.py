"""Tensor parallelism through the real entry point on gloo (real DTensors): 10-step loss curves in fp32
equal to one rank's for tp2, tp2 x dp_shard2 and tp2 x dp_replicate2, resumes across layouts with the
loader continuing exactly, a TP checkpoint exported to Hugging Face and imported into a TP run."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import TINY, ledger, losses, pretrain, tiny_data
from train.hf_export import export_hf

B, STEPS = 4, 10
# fp32 on the CPU; the warmup is as long as the run, so a resumed half sees the same learning rates.
BASE = [*TINY, f"global_batch_size={B}", f"steps={STEPS}", "optim.warmup_steps=10", "checkpoint.interval=5",
        "checkpoint.save_final=true", "data.seq_len=32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Runs shared by several tests, each started once: name -> run folder."""
    root = tmp_path_factory.mktemp("tp_runs")
    cache = {}

    def get(name: str, nproc: int, *overrides: str) -> Path:
        if name not in cache:
            pretrain(nproc, root / name, *BASE, *data, *overrides, torchrun=nproc > 1)
            cache[name] = root / name
        return cache[name]

    return get


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> list[float]:
    return [loss for _, loss in sorted(losses(run).items())]


def assert_ledger_complete(run: Path):
    """Every global sample of the 10 steps consumed exactly once, in the stream's order, though the
    ranks of a TP group read the same batch."""
    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, STEPS + 1))
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(STEPS * B))


# name -> (processes, layout overrides); "n1" is the one-rank reference.
LAYOUTS = {
    "n1": (1, [f"micro_batch_size={B}"]),
    "tp2": (2, ["parallel.tp=2", f"micro_batch_size={B}"]),
    "tp2_dp_shard2": (4, ["parallel.tp=2", "micro_batch_size=2"]),
    "tp2_dp_replicate2": (4, ["parallel.tp=2", "parallel.dp_replicate=2", "micro_batch_size=2"]),
    # 4 steps: float8 on the CPU is slow, and with the 10-step warmup the first 4 learning rates are the same.
    "tp2_float8": (2, ["parallel.tp=2", f"micro_batch_size={B}", "parallel.dtype=bf16", "parallel.float8=tensorwise",
                       "steps=4"]),
}


def run_of(runs, name: str) -> Path:
    nproc, layout = LAYOUTS[name]
    return runs(name, nproc, *layout)


@pytest.mark.parametrize("name", ["tp2", "tp2_dp_shard2", "tp2_dp_replicate2"])
def test_tp_layouts_match_one_rank(runs, name):
    reference, run = curve(run_of(runs, "n1")), run_of(runs, name)
    assert len(reference) == STEPS and reference[-1] < reference[0]  # it trains
    assert curve(run) == pytest.approx(reference, abs=1e-5)
    assert_ledger_complete(run)
    log = (run / "logs" / "rank0.log").read_text()
    assert "tensor parallel over 2 ranks" in log and "tp 2" in log
    validation = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert validation == pytest.approx([r["val_loss"] for r in metrics(run_of(runs, "n1")) if "val_loss" in r],
                                       abs=1e-5) and validation


def test_float8_under_tp(runs):
    """torchao's float8 linears split over 2 TP ranks (in bf16) train close to the fp32 one-rank run."""
    run = run_of(runs, "tp2_float8")
    assert "float8 matmuls (tensorwise scaling) in 14 of 14 block linears" in (run / "logs" / "rank0.log").read_text()
    reference = curve(run_of(runs, "n1"))[:4]
    assert curve(run) != reference and curve(run) == pytest.approx(reference, rel=1e-2)


@pytest.mark.parametrize("source, nproc, layout", [
    ("tp2", 1, [f"micro_batch_size={B}"]),  # tp2 -> tp1
    ("n1", 2, ["parallel.tp=2", "micro_batch_size=1"]),  # tp1 -> tp2, with 4 accumulation steps
    ("tp2_dp_shard2", 4, ["micro_batch_size=1"]),  # tp2 x dp2 -> dp4
])
def test_resume_across_layouts(runs, tmp_path, data, source, nproc, layout):
    """A copy of run `source` resumed from its step-5 checkpoint at another layout, to step 10."""
    run = tmp_path / "run"
    shutil.copytree(run_of(runs, source), run)
    proc = pretrain(nproc, run, *BASE, *data, "checkpoint.resume=5", *layout, torchrun=nproc > 1)
    assert "resumed from" in proc.stdout and "step_00000005" in proc.stdout
    assert curve(run) == pytest.approx(curve(run_of(runs, "n1")), abs=1e-5)  # DCP resharded model and optimizer
    assert_ledger_complete(run)


def test_hf_export_from_tp_and_import_into_tp(runs, tmp_path, data):
    """The tp2 run's last checkpoint as a Hugging Face folder; one rank and tp2 start from it alike."""
    final = run_of(runs, "tp2") / "checkpoints" / "step_00000010"
    tokenizer = next(a.split("=", 1)[1] for a in data if a.startswith("data.tokenizer="))
    hf = export_hf(final, tmp_path / "hf", tokenizer_path=tokenizer)
    start = ["steps=3", f"checkpoint.init_from={hf}", "checkpoint.interval=0"]
    one = pretrain(1, tmp_path / "one", *BASE, *data, *start, f"micro_batch_size={B}", torchrun=False)
    tp = pretrain(2, tmp_path / "tp", *BASE, *data, *start, "parallel.tp=2", "micro_batch_size=2")
    assert "initialised weights from" in one.stdout and "initialised weights from" in tp.stdout
    first = curve(tmp_path / "one")
    assert first[0] < curve(run_of(runs, "n1"))[0] - 0.5  # it started from the trained weights, not from scratch
    assert curve(tmp_path / "tp") == pytest.approx(first, abs=1e-5)


@pytest.mark.parametrize("change, seq_len, names", [
    ({"n_heads": 6, "n_kv_heads": 6, "dim": 96}, 32, "n_heads=6"),
    ({"vocab_size": 514}, 32, "model.vocab_size=516"),  # the padded size that would do
    ({"ffn_hidden_dim": 90}, 32, "hidden_dim=90"),
    ({}, 30, "data.seq_len=30"),
])
def test_layouts_tp_cannot_split_are_refused(change, seq_len, names):
    from model import ModelConfig
    from train.tensor_parallel import LayoutError, check_tp_layout

    model = ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 512, **change})
    with pytest.raises(LayoutError, match=names):
        check_tp_layout(model, seq_len, tp=4)
    check_tp_layout(model, seq_len, tp=1)  # no TP: nothing to split


def test_tp_across_nodes_warns(monkeypatch, caplog):
    from model import ModelConfig
    from train.tensor_parallel import check_tp_layout

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 processes per node, tp 4: a TP group spans 2 nodes
    check_tp_layout(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512), 32, tp=4)
    assert "larger than the 2 processes of a node" in caplog.text
