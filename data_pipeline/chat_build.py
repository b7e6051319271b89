"""Conversations (.jsonl/.json/.parquet records) to a chat shard set: token shards, a trained-token mask shard
beside each (NNNNNN.mask.bin, one byte a token: chat.py's NOT_TRAINED, TRAINED, START), and a manifest that says
`"format": "chat"`. Conversations are stored whole, in input order; packing them into windows is the loader's
(packing.py), since it depends on the run's seq_len.

Supervised data is small next to pretraining text, so this is one pass (no resumable parts): it is written in the
staging folder beside out_dir and renamed into place, so out_dir is absent, the old set, or the complete new one.
"""

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import build as text_build
from .chat import ChatEncoder, RecordError, messages_of
from .disk import writing
from .locking import file_lock
from .out_dir import MANIFEST, replace, up_to_date
from .progress import Meter
from .shard_format import VERSION
from .shard_writer import ShardWriter
from .shuffle import Permutation
from .sources import KINDS

RECORDS_PER_JOB = 256
MASK_VOCAB = 3  # the mask shards' "vocabulary": NOT_TRAINED, TRAINED, START
_worker = {}  # per worker process: the encoder and the split rule


def load_records(files: list[str]) -> list[tuple[str, object]]:
    """[(file, its records as a `datasets.Dataset`)], one file at a time so each keeps its own schema and every
    record can be named by its file and number."""
    import datasets
    datasets.disable_progress_bars()
    out = []
    for f in files:
        kind = KINDS.get(Path(f).suffix) if not f.startswith("hf:") else None
        if kind not in ("json", "parquet"):
            raise ValueError(f"{f}: format=chat reads .jsonl, .json or .parquet records of `messages` or "
                             f"`prompt`/`completion`; convert it or build it with format=text")
        try:
            out.append((f, datasets.load_dataset(kind, data_files=[f], split="train")))
        except Exception as e:  # datasets raises many types for a damaged file: name the file and the first bad line
            raise ValueError(f"{f}: {_bad_json_line(f) or 'not readable as ' + kind} ({type(e).__name__}); fix "
                             f"the file") from None
    return out


def _bad_json_line(path: str) -> str | None:
    if KINDS[Path(path).suffix] != "json" or Path(path).suffix != ".jsonl":
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not JSON ({e.msg})"
    return None


def _init(encoder: ChatEncoder, n_records: int, n_val: int, seed: int):
    _worker.update(encoder=encoder, n_val=n_val, split=Permutation(n_records, "split", seed))


def encode_job(job) -> dict:
    """(first global index, file, first row in file, records) -> {split: (tokens, masks, conversations)}."""
    start, path, row, records = job
    enc, out = _worker["encoder"], {"train": ([], [], 0), "val": ([], [], 0)}
    is_val = _worker["split"](np.arange(start, start + len(records))) < _worker["n_val"] if _worker["n_val"] else \
        np.zeros(len(records), dtype=bool)
    for i, (record, val) in enumerate(zip(records, is_val)):
        try:
            ids, mask = enc.encode(messages_of(record))
        except RecordError as e:
            raise ValueError(f"{path}: record {row + i + 1} {e}") from None
        tokens, masks, n = out["val" if val else "train"]
        tokens.append(ids)
        masks.append(mask)
        out["val" if val else "train"] = (tokens, masks, n + 1)
    return {s: (np.concatenate(t) if t else np.empty(0, np.int64), np.concatenate(m) if m else np.empty(0, np.uint8),
                n) for s, (t, m, n) in out.items()}


def _jobs(records: list[tuple[str, object]]):
    start = 0
    for path, ds in records:
        for row in range(0, len(ds), RECORDS_PER_JOB):
            part = ds[row:row + RECORDS_PER_JOB]
            yield start + row, path, row, [dict(zip(part, values)) for values in zip(*part.values())]
        start += len(ds)


def _encoded(jobs, num_proc: int, init_args):
    """encode_job over the jobs, in order: in this process for one core, else on a forked pool."""
    if num_proc == 1:
        _init(*init_args)
        yield from map(encode_job, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, _init, init_args) as pool:
        yield from pool.imap(encode_job, jobs, chunksize=1)


def build_chat_shards(inputs: list[str], out_dir, tokenizer, *, template: str = "", val_fraction: float = 0.0,
                      val_docs: int = 0, shard_tokens: int = text_build.DEFAULT_SHARD_TOKENS,
                      num_proc: int | None = None, seed: int = 0, overwrite: bool = False,
                      progress: bool = True) -> Path:
    """Render, tokenize and mask every conversation of inputs into out_dir; return the manifest's path."""
    encoder = ChatEncoder(tokenizer, template)
    settings = {"format": "chat", "template_sha256": _sha256(encoder.source), "val_fraction": val_fraction,
                "val_docs": val_docs, "shard_tokens": shard_tokens, "seed": seed}
    b = text_build._describe(inputs, Path(out_dir), tokenizer, settings, num_proc, progress)
    if template:
        from .out_dir import check_apart
        check_apart(b.out_dir, [], [], template)
    with file_lock(b.lock):
        if up_to_date(b.out_dir, b.fingerprint, overwrite):
            return b.out_dir / MANIFEST
        started = time.time()
        records = load_records(b.files)
        n = sum(len(ds) for _, ds in records)
        if n == 0:
            raise ValueError(f"{', '.join(b.files)}: the inputs hold no records")
        n_val = text_build._split_sizes(n, val_fraction, val_docs)
        set_dir = b.staging / "set"
        shutil.rmtree(b.staging, ignore_errors=True)
        try:
            splits = _write(b, set_dir, _encoded(_jobs(records), b.num_proc, (encoder, n, n_val, seed)), n)
            _write_manifest(set_dir, b, encoder, splits, n, n_val, time.time() - started)
            replace(set_dir, b.out_dir)
        finally:
            shutil.rmtree(b.staging, ignore_errors=True)
    return b.out_dir / MANIFEST


def _write(b, set_dir: Path, results, n_records: int) -> dict:
    """Each split's token and mask shards; returns the manifest's splits."""
    vocab, shard_tokens = b.tokenizer.vocab_size, b.settings["shard_tokens"]
    writers = {s: (ShardWriter(set_dir, s, shard_tokens, vocab),
                   ShardWriter(set_dir, s, shard_tokens, MASK_VOCAB, suffix=".mask.bin", dtype=np.dtype("u1")))
               for s in ("train", "val")}
    meter = Meter("rendering and tokenizing", text_build.log, n_records, "conversations", enabled=b.progress)
    try:
        for result in results:
            for split, (tokens, masks, n) in result.items():
                writers[split][0].add(tokens, n)
                writers[split][1].add(masks)
            meter.update(sum(n for _, _, n in result.values()))
    finally:
        meter.close(complete=meter.done == n_records)
    splits = {}
    for split, (token_writer, mask_writer) in writers.items():
        info, masks = token_writer.finish(), mask_writer.finish()
        if info["tokens"]:
            splits[split] = {**info, "masks": masks["shards"], "trained_tokens": _trained(set_dir, masks)}
    if "train" not in splits:
        raise ValueError("every conversation went to the validation split; lower val_fraction/val_docs")
    return splits


def _trained(set_dir: Path, masks: dict) -> int:
    from .shard_format import HEADER_BYTES
    return sum(int(np.count_nonzero(np.fromfile(set_dir / m["file"], np.uint8, offset=HEADER_BYTES) == 1))
               for m in masks["shards"])


def _sha256(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


def _write_manifest(set_dir: Path, b, encoder: ChatEncoder, splits: dict, n: int, n_val: int, seconds: float):
    """The manifest, written last: its presence means complete."""
    manifest = {
        "format_version": VERSION, "format": "chat", "fingerprint": b.fingerprint, "created_unix": int(time.time()),
        "tokenizer": b.tokenizer.identity(), "dtype": text_build.dtype_for_vocab(b.tokenizer.vocab_size).name,
        "vocab_size": b.tokenizer.vocab_size, "sources": b.sources, "settings": b.settings,
        "chat_template": {"source": encoder.template_path, "sha256": b.settings["template_sha256"]},
        "documents": n, "val_documents_chosen": n_val,
        "input_bytes": sum(s["bytes"] for s in b.sources if "bytes" in s), "build_seconds": round(seconds, 3),
        "splits": splits,
    }
    tmp = set_dir / (MANIFEST + ".tmp")
    with writing(tmp):
        tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, set_dir / MANIFEST)
