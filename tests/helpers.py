"""Shared by the trainer and checkpoint tests: run the real entry point and read what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A small model so each run takes seconds on 2 cores; the data is real text.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "steps=6", "log_interval=1", "val_batches=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        "checkpoint.save_final=false", "wandb.mode=disabled", "sample_prompt=''"]


def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides naming a SentencePiece tokenizer and shard set built from four real plays (built
    once per test session)."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.getbasetemp() / "tiny_data"
    root.mkdir(exist_ok=True)
    files = [str(p) for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]]
    model = root / "tok.model"
    tok = Tokenizer(model) if model.is_file() else train_tokenizer(files, model, vocab_size=512)
    shards = build_shards(files, root / "shards", tok, val_fraction=0.25, num_proc=1).parent
    return ["data.demo=false", f"data.tokenizer={tok.path}", f"data.shards=[{shards}]"]


def pretrain_cmd(nproc: int, run_dir: Path, *overrides: str, conf: str = "debug") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "launch" / "pretrain.py"), f"+conf={conf}", f"hydra.run.dir={run_dir}", *overrides]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def pretrain(nproc: int, run_dir: Path, *overrides: str, conf: str = "debug", check: bool = True):
    """Run launch/pretrain.py under torchrun; returns the finished process."""
    proc = subprocess.run(pretrain_cmd(nproc, run_dir, *overrides, conf=conf), cwd=run_dir.parent, env=env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def without_torchrun_summary(stderr: str) -> str:
    """stderr without torchrun's own failure summary (a traceback that ends in ChildFailedError)."""
    end = stderr.find("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    return stderr if end < 0 else stderr[: stderr.rfind("Traceback (most recent call last)", 0, end)]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step; a step logged twice (re-done after a resume) keeps its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def ledger(run_dir: Path) -> dict[int, list[int]]:
    """Global samples consumed by each step, over all ranks (the last write of a step counts)."""
    by_step: dict[int, dict[str, list[int]]] = {}
    for f in sorted((run_dir / "ledger").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            by_step.setdefault(row["step"], {})[f.name] = row["samples"]
    return {step: sorted(s for rank in ranks.values() for s in rank) for step, ranks in sorted(by_step.items())}


def children(pid: int) -> list[int]:
    """Direct child processes of pid (torchrun's workers), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
