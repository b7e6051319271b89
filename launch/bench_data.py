"""Data pipeline benchmark: build MB/s and tokens/s (1 and 2 cores) vs raw SentencePiece, loader tokens/s and RSS.

    python launch/bench_data.py [--work /tmp/bench_data] [--vocab 8192] [--seq-len 2048] [--loader-tokens 400e6]
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_pipeline.build import build_shards  # noqa: E402
from data_pipeline.loader import ShardSet, TokenLoader  # noqa: E402
from data_pipeline.sample_corpus import SHARED, sample_corpus_dir  # noqa: E402
from data_pipeline.shard_format import VERSION, write_shard  # noqa: E402
from data_pipeline.sources import load_documents  # noqa: E402
from data_pipeline.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def rss_mib() -> dict:
    """Resident memory of this process, split into anonymous (heap) and file-backed (mapped shards)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}


def corpus_inputs() -> list[str]:
    """The three shared layouts when present, else the sample corpus."""
    if (SHARED.parent / "sotu.jsonl").is_file():
        return [str(SHARED.parent / "sotu.jsonl"), str(SHARED), str(SHARED.parent / "moby_dick.txt")]
    return [str(sample_corpus_dir())]


def bench_build(work: Path, vocab: int) -> dict:
    inputs = corpus_inputs()
    model = work / f"tok{vocab}.model"
    tok = Tokenizer(model) if model.is_file() else train_tokenizer(inputs, model, vocab)
    texts = load_documents(inputs)["text"]  # also warms the datasets cache, so both sides read Arrow
    nbytes = sum(len(t.encode()) for t in texts)
    t0 = time.perf_counter()
    n_tokens = sum(len(tok.sp.Encode(t)) for t in texts)  # the raw tokenizer, one process, one thread
    raw_s = time.perf_counter() - t0
    out = {"input_MB": nbytes / 1e6, "raw": {"seconds": raw_s, "MB_s": nbytes / raw_s / 1e6,
                                              "tokens_s": n_tokens / raw_s}}
    for cores in (1, 2):
        shutil.rmtree(work / f"shards{cores}", ignore_errors=True)
        t0 = time.perf_counter()
        m = build_shards(inputs, work / f"shards{cores}", tok, num_proc=cores, val_fraction=0.01, progress=False)
        s = time.perf_counter() - t0
        tokens = sum(v["tokens"] for v in json.loads(m.read_text())["splits"].values())
        per_core = nbytes / s / cores
        out[f"{cores}_core"] = {"seconds": s, "MB_s": nbytes / s / 1e6, "tokens_s": tokens / s,
                                "overhead_per_core_pct": 100 * (nbytes / raw_s / per_core - 1)}
    return out


def replicate(src: ShardSet, dest: Path, total_tokens: int, shard_tokens: int = 1 << 26) -> Path:
    """A large shard set made of real tokens repeated, to see whether loader memory grows with corpus size."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "train").mkdir(parents=True)
    stream = np.empty(src.n_tokens, dtype=src.dtype)
    src.read(0, stream)
    shards, written = [], 0
    while written < total_tokens:
        n = min(shard_tokens, total_tokens - written)
        tokens = np.resize(stream, n)
        entry = write_shard(dest / "train" / f"{len(shards):06d}.bin", tokens, src.vocab_size)
        entry["file"] = f"train/{entry['file']}"
        shards.append(entry)
        written += n
    manifest = dict(src.manifest, format_version=VERSION,
                    splits={"train": {"tokens": written, "documents": 0, "shards": shards}})
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def bench_loader(shards_dir: Path, seq_len: int, batch: int, steps: int) -> dict:
    before = rss_mib()
    shardset = ShardSet.open(shards_dir, "train", verify=False)
    loader = TokenLoader(shardset, seq_len=seq_len, global_batch_size=batch, seed=0)
    next(loader)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(loader)
    s = time.perf_counter() - t0
    return {"corpus_tokens": shardset.n_tokens, "tokens_s": steps * b["input_ids"].numel() / s,
            "rss_before_MiB": before, "rss_after_MiB": rss_mib()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_data")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--loader-tokens", type=float, default=400e6)
    p.add_argument("--skip-build", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.skip_build:
        results["build"] = bench_build(work, args.vocab)
        print(json.dumps(results["build"], indent=1), flush=True)
    small = work / "shards1"
    big = replicate(ShardSet.open(small, "train"), work / "big", int(args.loader_tokens))
    results["loader_small"] = bench_loader(small, args.seq_len, args.batch, args.steps)
    results["loader_big"] = bench_loader(big, args.seq_len, args.batch, args.steps)
    print(json.dumps({k: v for k, v in results.items() if k != "build"}, indent=1))
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
