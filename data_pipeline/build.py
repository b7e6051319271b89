"""Raw text to token shards: parallel tokenization, document-level split, atomic manifest-last commit."""

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import encode_worker
from .disk import writing
from .locking import file_lock
from .out_dir import MANIFEST, check_apart, replace, up_to_date
from .shard_format import VERSION, dtype_for_vocab, write_shard
from .sources import describe_inputs, load_documents, resolve_inputs
from .tokenizer import Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MiB as uint16, few files even for 100B-token corpora
CHUNK_BYTES = 1 << 20  # text sent to a worker at a time: large enough to amortise IPC, small for a smooth bar


class ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens (the last one shorter)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int):
        self.dir, self.split, self.shard_tokens, self.vocab_size = out_dir / split, split, shard_tokens, vocab_size
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending, self.pending_tokens = [], 0
        self.shards, self.tokens, self.documents = [], 0, 0

    def add(self, tokens: np.ndarray, documents: int):
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        self.tokens += tokens.size
        self.documents += documents
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:self.shard_tokens])
            self.pending, self.pending_tokens = [stream[self.shard_tokens:]], stream.size - self.shard_tokens

    def _write(self, tokens: np.ndarray):
        entry = write_shard(self.dir / f"{len(self.shards):06d}.bin", tokens, self.vocab_size)
        entry["file"] = f"{self.split}/{entry['file']}"
        self.shards.append(entry)

    def finish(self) -> dict:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _split_sizes(n_docs: int, val_fraction: float, val_docs: int) -> int:
    """Number of validation documents from a fraction or a count."""
    if val_fraction and val_docs:
        raise ValueError("set val_fraction or val_docs, not both")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    n_val = val_docs if val_docs else (max(1, round(val_fraction * n_docs)) if val_fraction else 0)
    if n_val < 0 or (n_val and n_val >= n_docs):
        raise ValueError(f"validation split of {n_val} documents leaves no training documents out of {n_docs}; "
                         f"lower val_fraction/val_docs")
    return n_val


def _chunks(docs, num_proc: int):
    """(first doc index, texts, bytes) jobs of about CHUNK_BYTES each, read from the memory-mapped Arrow table."""
    import pyarrow.compute as pc
    sizes = pc.binary_length(docs.data.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(sizes)
    target = max(1, min(CHUNK_BYTES, int(ends[-1]) // (4 * num_proc)))  # >= 4 jobs per worker
    cuts = np.unique(np.searchsorted(ends, np.arange(target, int(ends[-1]), target)) + 1)
    bounds = [0, *cuts[cuts < len(docs)].tolist(), len(docs)]
    for a, b in zip(bounds, bounds[1:]):
        yield a, docs[a:b]["text"], int(ends[b - 1] - (ends[a - 1] if a else 0))


def _encoded(jobs, num_proc: int, init_args):
    """Encode jobs in order, in-process for one core, else on a bounded pool (texts are not all read ahead).
    A `tokenizers` tokenizer always encodes in worker processes: there its thread pool is off, so one worker is
    one core, and whole chunks go in one call (text by text, which is all one thread can do here, costs more)."""
    if num_proc == 1 and init_args[0].backend is None:
        encode_worker.init(*init_args)
        for start, texts, nbytes in jobs:
            yield encode_worker.encode_chunk((start, texts)), nbytes
        return
    # fork: workers start in milliseconds, need no importable __main__ and inherit the loaded tokenizer; they touch
    # only the tokenizer and numpy, never the parent's Arrow/CUDA threads' state
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, encode_worker.init_process, init_args) as pool:
        in_flight = collections.deque()
        for start, texts, nbytes in jobs:
            in_flight.append((pool.apply_async(encode_worker.encode_chunk, ((start, texts),)), nbytes))
            if len(in_flight) >= 2 * num_proc:
                result, n = in_flight.popleft()
                yield result.get(), n
        while in_flight:
            result, n = in_flight.popleft()
            yield result.get(), n


def _fingerprint(sources, settings, tokenizer: Tokenizer) -> str:
    blob = json.dumps({"sources": sources, "settings": settings, "tokenizer": tokenizer.sha256,
                       "format": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_shards(inputs: list[str], out_dir, tokenizer: Tokenizer, *, text_field: str = "text",
                 txt_mode: str = "file", val_fraction: float = 0.0, val_docs: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, num_proc: int | None = None, seed: int = 0,
                 overwrite: bool = False, progress: bool = True, encoding_errors: str = "strict") -> Path:
    """Tokenize inputs into out_dir/{train,val}/*.bin plus out_dir/manifest.json; return the manifest path.
    overwrite=True replaces a previous shard set in out_dir, never anything else."""
    out_dir = Path(out_dir)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer(tokenizer)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    files = resolve_inputs(inputs)
    for tokenizer_file in tokenizer.source_files:
        check_apart(out_dir, inputs, files, tokenizer_file)
    sources = describe_inputs(files)
    settings = {"text_field": text_field, "txt_mode": txt_mode, "val_fraction": val_fraction,
                "val_docs": val_docs, "shard_tokens": shard_tokens, "seed": seed}
    if encoding_errors != "strict":  # only when set, so the fingerprints of earlier builds stay as they were
        settings["encoding_errors"] = encoding_errors
    settings.update(tokenizer.overrides)  # bos_token/eos_token given: other ids than the tokenizer's files say
    fingerprint = _fingerprint(sources, settings, tokenizer)

    # one builder per out_dir at a time; a crashed builder's lock dies with it
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if up_to_date(out_dir, fingerprint, overwrite):
            return out_dir / MANIFEST
        # build beside out_dir and rename at the end: out_dir is either absent, old, or complete
        staging = out_dir.parent / f".{out_dir.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted build: start over
        staging.mkdir(parents=True)
        try:
            _build_into(staging, files, sources, settings, fingerprint, tokenizer, num_proc, progress)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # no half-built set stays behind, even on Ctrl-C
            raise
        replace(staging, out_dir)
    return out_dir / MANIFEST


def _build_into(staging: Path, files, sources, settings, fingerprint, tokenizer, num_proc, progress):
    """Write shards and, last, the manifest into the staging folder."""
    docs = load_documents(files, text_field=settings["text_field"], txt_mode=settings["txt_mode"],
                          encoding_errors=settings.get("encoding_errors", "strict"))
    n_val = _split_sizes(len(docs), settings["val_fraction"], settings["val_docs"])
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writers = {s: ShardWriter(staging, s, settings["shard_tokens"], tokenizer.vocab_size) for s in ("train", "val")}
    init_args = (tokenizer, dtype.str, len(docs), n_val, settings["seed"])

    started, input_bytes, tokens = time.time(), 0, 0
    bar = tqdm(total=None, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True)
    for result, nbytes in _encoded(_chunks(docs, num_proc), num_proc, init_args):
        for split, (split_tokens, n_docs) in result.items():
            writers[split].add(split_tokens, n_docs)
            tokens += split_tokens.size
        input_bytes += nbytes
        bar.update(nbytes)
        bar.set_postfix_str(f"{tokens / max(time.time() - started, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
    bar.close()
    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise ValueError(f"{', '.join(files)}: every document is blank; check inputs, text_field and txt_mode")

    manifest = {
        "format_version": VERSION, "fingerprint": fingerprint, "created_unix": int(time.time()),
        "tokenizer": tokenizer.identity(), "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "sources": sources, "settings": settings, "documents": len(docs), "val_documents_chosen": n_val,
        "input_bytes": input_bytes, "build_seconds": round(time.time() - started, 3), "splits": splits,
    }
    tmp = staging / (MANIFEST + ".tmp")
    with writing(tmp):
        tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, staging / MANIFEST)  # the manifest is written last: its presence means complete
