"""Data pipeline benchmark: build MB/s and tokens/s (1 and 2 cores) vs the raw tokenizer library, loader tokens/s, RSS.

    python benchmarks/bench_data.py [--work /tmp/bench_data] [--vocab 8192] [--repeats 3] [--loader-tokens 400e6]
    python benchmarks/bench_data.py --tokenizer path/to/Llama-3.1-8B --tokenizer tok.model   # these tokenizers
    python benchmarks/bench_data.py --skip-build   # loader only, in a fresh process: its own resident memory

Raw: SentencePiece's Encode(texts, num_threads=N), or `tokenizers`' encode_batch_fast(texts) with its pool of N
threads (RAYON_NUM_THREADS), next to the builder with N processes, on the same corpus and cores.
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data_pipeline.build import build_shards
from data_pipeline.loader import ShardSet, TokenLoader
from data_pipeline.sample_corpus import REPO, SHARED, sample_corpus_dir
from data_pipeline.shard_format import VERSION, write_shard
from data_pipeline.sources import load_documents
from data_pipeline.tokenizer import Tokenizer, train_tokenizer


def rss_mib() -> dict:
    """Resident memory of this process, split into anonymous (heap) and file-backed (mapped shards)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the builder's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def corpus_inputs() -> list[str]:
    """The three shared layouts when present (the 1.2 MB single-document novel first, so that on a corpus
    this small one worker is not left encoding it alone at the end), else the sample corpus."""
    if (SHARED.parent / "sotu.jsonl").is_file():
        return [str(SHARED.parent / "moby_dick.txt"), str(SHARED.parent / "sotu.jsonl"), str(SHARED)]
    return [str(sample_corpus_dir())]


def raw_encode(tokenizer: str, cores: int, repeats: int) -> dict:
    """The tokenizer's own library encoding the corpus in one batch call on `cores` threads, best of `repeats`, in a
    fresh process (the `tokenizers` thread pool is sized once per process, by RAYON_NUM_THREADS)."""
    cmd = [sys.executable, __file__, "--raw", tokenizer, "--cores", str(cores), "--repeats", str(repeats)]
    env = {**os.environ, "RAYON_NUM_THREADS": str(cores), "TOKENIZERS_PARALLELISM": "true"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def raw_main(tokenizer: str, cores: int, repeats: int):
    """--raw: SentencePiece's Encode(texts, num_threads=cores) or tokenizers' encode_batch_fast(texts): MB/s, tok/s."""
    tok = Tokenizer(tokenizer)
    texts = list(load_documents(corpus_inputs())["text"])
    nbytes = sum(len(t.encode()) for t in texts)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        if tok.sp is not None:
            n_tokens = sum(map(len, tok.sp.Encode(texts, num_threads=cores)))
        else:  # the library's batch call as a user makes it: ids only, no BOS/EOS
            n_tokens = sum(map(len, tok.backend.encode_batch_fast(texts, add_special_tokens=False)))
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    s = min(times)  # best of `repeats`: the machine's cores are shared with other work
    print(json.dumps({"seconds": s, "cpu_seconds": min(cpu), "MB_s": nbytes / s / 1e6, "tokens_s": n_tokens / s}))


def bench_build(work: Path, tok: Tokenizer, repeats: int) -> dict:
    """The builder on 1 and 2 processes next to the raw library on as many threads, same corpus, same machine."""
    inputs = corpus_inputs()
    out = {"tokenizer": str(tok.path), "format": tok.format, "vocab_size": tok.vocab_size}
    for cores in (1, 2):
        raws, times, cpu = [], [], []
        for _ in range(repeats):  # alternately, so that other load on shared cores falls on both sides alike
            raws.append(raw_encode(str(tok.path), cores, 2))  # best of 2: a warm cache, as the builder's
            shutil.rmtree(work / f"shards_{tok.format}{cores}", ignore_errors=True)
            t0, c0 = time.perf_counter(), cpu_seconds()
            m = build_shards(inputs, work / f"shards_{tok.format}{cores}", tok, num_proc=cores, val_fraction=0.01,
                             progress=False)
            times.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)
        raw = {**min(raws, key=lambda r: r["seconds"]), "cpu_seconds": min(r["cpu_seconds"] for r in raws)}
        s, manifest = min(times), json.loads(m.read_text())
        tokens = sum(v["tokens"] for v in manifest["splits"].values())
        out[f"{cores}_core"] = {
            "builder": {"seconds": s, "cpu_seconds": min(cpu), "MB_s": manifest["input_bytes"] / s / 1e6,
                        "tokens_s": tokens / s},
            "raw": raw, "builder_vs_raw_MB_s": raw["seconds"] / s,
            # CPU time: all the work the build did (main process + workers) against the raw call's (all threads);
            # less disturbed than wall-clock by other load on shared cores
            "builder_vs_raw_cpu": raw["cpu_seconds"] / min(cpu)}
    return out


def bench_tokenizers(work: Path, paths: list[str], vocab: int, repeats: int) -> dict:
    """Each tokenizer given, else a SentencePiece model trained here and a Llama-3-format tokenizer.json made like
    the tests' (tests/support/llama3_artifacts.py: byte-level BPE, Llama 3's split pattern, vocabulary 128,256)."""
    if not paths:
        model = work / f"tok{vocab}.model"
        sp = model if model.is_file() else train_tokenizer(corpus_inputs(), model, vocab).path
        paths = [str(sp), str(suite_helper("llama3_artifacts").llama3_tokenizer(work / "llama3") / "hf")]
    load_documents(corpus_inputs())  # warm the datasets cache, so both sides read Arrow
    results = {}
    for path in paths:
        tok = Tokenizer(path)
        results[f"{tok.format}:{path}"] = r = bench_build(work, tok, repeats)
        for cores in (1, 2):
            b, raw = r[f"{cores}_core"]["builder"], r[f"{cores}_core"]["raw"]
            print(f"{tok.format:>13} {cores} core(s): builder {b['MB_s']:6.2f} MB/s {b['tokens_s'] / 1e6:6.3f} M tok/s"
                  f" | raw {raw['MB_s']:6.2f} MB/s {raw['tokens_s'] / 1e6:6.3f} M tok/s | builder/raw "
                  f"{r[f'{cores}_core']['builder_vs_raw_MB_s']:.2f} (CPU time: "
                  f"{r[f'{cores}_core']['builder_vs_raw_cpu']:.2f})", flush=True)
    return results


def replicate(src: ShardSet, dest: Path, total_tokens: int, shard_tokens: int = 1 << 26) -> Path:
    """A large shard set made of real tokens repeated, to see whether loader memory grows with corpus size."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "train").mkdir(parents=True)
    stream = np.empty(src.n_tokens, dtype=src.dtype)
    src.read(0, stream)
    shards, written, documents = [], 0, 0
    while written < total_tokens:
        n = min(shard_tokens, total_tokens - written)
        tokens = np.resize(stream, n)
        documents += int((tokens == src.bos_id).sum())  # what `verify` counts
        entry = write_shard(dest / "train" / f"{len(shards):06d}.bin", tokens, src.vocab_size)
        entry["file"] = f"train/{entry['file']}"
        shards.append(entry)
        written += n
    manifest = dict(src.manifest, format_version=VERSION,
                    splits={"train": {"tokens": written, "documents": documents, "shards": shards}})
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


def suite_helper(name: str):
    """A module of the test suite's helpers (tests/**/NAME.py), loaded from its file: a benchmark edits no
    sys.path."""
    path = next((REPO / "tests").rglob(f"{name}.py"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is imported (data_pipeline does it when it reads)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_data")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--loader-tokens", type=float, default=400e6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--tokenizer", action="append", default=[], help="a tokenizer file or folder (repeatable)")
    p.add_argument("--raw", help=argparse.SUPPRESS)  # internal: the raw library's figure, in its own process
    p.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw:
        return raw_main(args.raw, args.cores, args.repeats)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.skip_build:
        results["build"] = bench_tokenizers(work, args.tokenizer, args.vocab, args.repeats)
        print(json.dumps(results["build"], indent=1), flush=True)
    small = min(work.glob("shards_*1"))  # the first tokenizer's one-core build
    big = replicate(ShardSet.open(small, "train"), work / "big", int(args.loader_tokens))
    results["loader_small"] = bench_loader(small, args.seq_len, args.batch, args.steps)
    results["loader_big"] = bench_loader(big, args.seq_len, args.batch, args.steps)
    print(json.dumps({k: v for k, v in results.items() if k != "build"}, indent=1))
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
