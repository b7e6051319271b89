"""Raw text to token shards: parallel tokenization in resumable parts, document-level split, manifest-last commit.

The documents are cut into parts (parts.py), each tokenized and committed on its own, then merged into one shard set
(merge.py) that equals what one pass over all documents writes. On one machine the parts are of about part_bytes of
text, built in turn, so a rerun after a crash or Ctrl-C skips those already built. On a SLURM array
(launch/slurm/build_shards.sbatch) task K runs parts=N part=K, and the task that finds all N built merges them.
"""

import collections
import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import encode_worker
from .disk import writing
from .locking import file_lock
from .merge import merge_parts
from .out_dir import MANIFEST, check_apart, replace, up_to_date
from .parts import PartBuilder, Plan, complete_parts, offsets, part_ranges, prune, read_part
from .progress import Meter
from .shard_format import VERSION, dtype_for_vocab
from .sources import describe_inputs, load_documents, resolve_inputs
from .tokenizer import Tokenizer

log = logging.getLogger("data_pipeline")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MiB as uint16, few files even for 100B-token corpora
CHUNK_BYTES = 1 << 20  # text sent to a worker at a time: large enough to amortise IPC, small for a smooth bar
# text per part on one machine: the most work an interruption loses (minutes), and few enough parts that their
# commits cost nothing (the pool does not wait between parts, and the merge copies two shards a part at most)
DEFAULT_PART_BYTES = 1 << 30


@dataclass
class Build:
    """One build as decided before any work: where it goes, what it reads, its settings and fingerprint."""
    out_dir: Path
    files: list[str]
    sources: list[dict]
    settings: dict
    fingerprint: str
    tokenizer: Tokenizer
    num_proc: int
    progress: bool

    @property
    def staging(self) -> Path:
        """Beside out_dir: parts/ and the merged set/, which is renamed into place, so out_dir is absent, old or
        complete."""
        return self.out_dir.parent / f".{self.out_dir.name}.partial"

    @property
    def lock(self) -> Path:
        """Held by a one-machine build throughout and by a merge: one per out_dir; a crashed holder's lock dies
        with it."""
        return self.out_dir.parent / f".{self.out_dir.name}.lock"


def _split_sizes(n_docs: int, val_fraction: float, val_docs: int, whole_txt_files: bool = False) -> int:
    """Number of validation documents from a fraction or a count. whole_txt_files: some inputs are .txt files read
    one document each (txt_mode=file), so a one-book corpus is one document, and the fix is another txt_mode."""
    if val_fraction and val_docs:
        raise ValueError("set val_fraction or val_docs, not both")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    n_val = val_docs if val_docs else (max(1, round(val_fraction * n_docs)) if val_fraction else 0)
    if n_val < 0 or (n_val and n_val >= n_docs):
        why = " (txt_mode=file reads each .txt file as one document)" if whole_txt_files else ""
        fix = "pass txt_mode=paragraph (or line), or lower" if whole_txt_files else "lower"
        raise ValueError(f"validation split of {n_val} documents leaves no training documents out of {n_docs}{why}; "
                         f"{fix} val_fraction/val_docs")
    return n_val


def _chunks(docs, ends: np.ndarray, a: int, b: int, num_proc: int):
    """(first doc index, texts, bytes) jobs of about CHUNK_BYTES each over documents [a, b), read from the
    memory-mapped Arrow table; one empty job for an empty range, so that every part has a job."""
    if a == b:
        yield a, [], 0
        return
    base = int(ends[a - 1]) if a else 0
    total = int(ends[b - 1]) - base
    target = max(1, min(CHUNK_BYTES, total // (4 * num_proc)))  # >= 4 jobs per worker
    cuts = np.unique(np.searchsorted(ends[a:b] - base, np.arange(target, total, target)) + 1) + a
    bounds = [a, *cuts[cuts < b].tolist(), b]
    for x, y in zip(bounds, bounds[1:]):
        yield x, docs[x:y]["text"], int(ends[y - 1] - (ends[x - 1] if x else 0))


@contextlib.contextmanager
def _encoder(num_proc: int, init_args):
    """encode(jobs): each (tag, first doc index, texts, bytes) job's (tag, result, bytes), in order. In-process for one
    core, else on one bounded pool for the whole build (texts are not all read ahead; parts follow each other in it
    without a pause). A `tokenizers` tokenizer always encodes in worker processes: there its thread pool is off, so
    one worker is one core, and whole chunks go in one call (text by text, which is all one thread can do here,
    costs more)."""
    if num_proc == 1 and init_args[0].backend is None:
        encode_worker.init(*init_args)
        yield lambda jobs: ((tag, encode_worker.encode_chunk((start, texts)), n) for tag, start, texts, n in jobs)
        return
    # fork: workers start in milliseconds, need no importable __main__ and inherit the loaded tokenizer; they touch
    # only the tokenizer and numpy, never the parent's Arrow/CUDA threads' state
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, encode_worker.init_process, init_args) as pool:
        yield functools.partial(_in_order, pool, num_proc)


def _in_order(pool, num_proc: int, jobs):
    """The pool's results in job order, at most 2 x num_proc jobs in flight."""
    in_flight = collections.deque()
    for tag, start, texts, nbytes in jobs:
        in_flight.append((tag, pool.apply_async(encode_worker.encode_chunk, ((start, texts),)), nbytes))
        if len(in_flight) >= 2 * num_proc:
            tag, result, n = in_flight.popleft()
            yield tag, result.get(), n
    while in_flight:
        tag, result, n = in_flight.popleft()
        yield tag, result.get(), n


def _fingerprint(sources, settings, tokenizer: Tokenizer) -> str:
    blob = json.dumps({"sources": sources, "settings": settings, "tokenizer": tokenizer.sha256,
                       "format": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_shards(inputs: list[str], out_dir, tokenizer: Tokenizer, *, text_field: str = "text",
                 txt_mode: str = "file", val_fraction: float = 0.0, val_docs: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, num_proc: int | None = None, seed: int = 0,
                 overwrite: bool = False, progress: bool = True, encoding_errors: str = "strict",
                 parts: int | None = None, part: int | None = None,
                 part_bytes: int = DEFAULT_PART_BYTES) -> Path | None:
    """Tokenize inputs into out_dir/{train,val}/*.bin plus out_dir/manifest.json; return the manifest path.
    overwrite=True replaces a previous shard set in out_dir, never anything else.
    parts=N part=K: build only part K of N (one task of a SLURM array), then merge if all N are built; returns None
    while some are not. parts=N alone: merge the N parts built before with part=0..N-1, tokenizing nothing.
    The result never depends on the parts: the same bytes from one machine or from any N."""
    _check_parts(parts, part, part_bytes)
    settings = {"text_field": text_field, "txt_mode": txt_mode, "val_fraction": val_fraction,
                "val_docs": val_docs, "shard_tokens": shard_tokens, "seed": seed}
    if encoding_errors != "strict":  # only when set, so the fingerprints of earlier builds stay as they were
        settings["encoding_errors"] = encoding_errors
    b = _describe(inputs, Path(out_dir), tokenizer, settings, num_proc, progress)
    if parts is None:
        return _build_here(b, part_bytes, overwrite)
    if part is None:
        return _merge_built(b, parts, overwrite)
    return _build_part(b, parts, part, overwrite)


def _check_parts(parts: int | None, part: int | None, part_bytes: int):
    if part is not None and parts is None:
        raise ValueError(f"part={part} needs parts=N, the number of parts the build is split into (the array size)")
    if parts is not None and parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    if part is not None and not 0 <= part < parts:
        raise ValueError(f"part={part} is not one of parts={parts}: parts are numbered 0 to {parts - 1}")
    if part_bytes < 1:
        raise ValueError(f"part_bytes={part_bytes} must be positive")


def _describe(inputs, out_dir: Path, tokenizer, settings: dict, num_proc: int | None, progress: bool) -> Build:
    """Check what can be checked before reading any text, and fingerprint the build."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer(tokenizer)
    if settings["shard_tokens"] < 1:
        raise ValueError(f"shard_tokens={settings['shard_tokens']} must be positive")
    files = resolve_inputs(inputs)
    for tokenizer_file in tokenizer.source_files:
        check_apart(out_dir, inputs, files, tokenizer_file)
    sources = describe_inputs(files)
    settings.update(tokenizer.overrides)  # bos_token/eos_token given: other ids than the tokenizer's files say
    return Build(out_dir, files, sources, settings, _fingerprint(sources, settings, tokenizer), tokenizer,
                 max(1, num_proc or os.cpu_count() or 1), progress)


def _load(b: Build, n_parts: int | None, part_bytes: int = DEFAULT_PART_BYTES):
    """The documents, their cumulative text bytes, and the plan of parts: n_parts, or as many as part_bytes makes.
    The split is decided here, over all documents, so each part splits its own by their global indices."""
    import pyarrow.compute as pc
    docs = load_documents(b.files, text_field=b.settings["text_field"], txt_mode=b.settings["txt_mode"],
                          encoding_errors=b.settings.get("encoding_errors", "strict"))
    whole_txt_files = b.settings["txt_mode"] == "file" and any(Path(f).suffix == ".txt" for f in b.files)
    n_val = _split_sizes(len(docs), b.settings["val_fraction"], b.settings["val_docs"], whole_txt_files)
    ends = np.cumsum(pc.binary_length(docs.data.column("text")).to_numpy(zero_copy_only=False).astype(np.int64))
    n_parts = n_parts or max(1, -(-int(ends[-1]) // part_bytes))
    plan = Plan(b.staging / "parts", b.fingerprint, len(docs), n_val, part_ranges(ends, n_parts),
                dtype_for_vocab(b.tokenizer.vocab_size))
    return docs, ends, plan


def _build_here(b: Build, part_bytes: int, overwrite: bool) -> Path:
    """One machine: every part in turn, resuming after the last one built, then the merge; all under b.lock."""
    with file_lock(b.lock):
        if up_to_date(b.out_dir, b.fingerprint, overwrite):
            shutil.rmtree(b.staging, ignore_errors=True)  # left by a build stopped right after its rename
            return b.out_dir / MANIFEST
        started = time.time()  # loading the documents is part of the build's time, as is the first chunk
        docs, ends, plan = _load(b, None, part_bytes)
        records, _ = complete_parts(plan)
        removed = prune(plan, set(records))  # other builds' or layouts' parts are never reused: free their disk
        if removed:
            log.info(f"removed {removed} part(s) of another build or part count from {plan.folder}")
        if records:
            log.info(f"resuming: {len(records)} of {len(plan.ranges)} parts already built in {plan.folder}")
        _tokenize(b, docs, ends, plan, records, [k for k in range(len(plan.ranges)) if k not in records], started)
        return _finish(b, plan, records)


def _build_part(b: Build, n_parts: int, k: int, overwrite: bool) -> Path | None:
    """Array task k: build part k unless it is built, then merge if every part is; None while some are not."""
    if up_to_date(b.out_dir, b.fingerprint, overwrite):
        log.info(f"part {k} of {n_parts}: {b.out_dir} already holds this build; nothing to do")
        return b.out_dir / MANIFEST
    started = time.time()
    docs, ends, plan = _load(b, n_parts)
    plan.folder.mkdir(parents=True, exist_ok=True)
    with file_lock(plan.folder / f"{plan.name(k)}.lock"):  # the same task twice at once: one builds, one skips
        before, _ = complete_parts(plan, upto=k, stop=True)  # all built: part k's shards can be the set's own
        if read_part(plan, k)[0] is not None or up_to_date(b.out_dir, b.fingerprint, overwrite):
            log.info(f"part {k} of {n_parts} already built: skipped")
        else:
            _tokenize(b, docs, ends, plan, before, [k], started)
            r = before[k]
            log.info(f"part {k} of {n_parts} built: documents {r['documents'][0]:,} to {r['documents'][1]:,} "
                     f"({r['input_bytes'] / 1e6:.1f} MB of text) in {r['seconds']:.1f}s")
    with file_lock(b.lock):
        if up_to_date(b.out_dir, b.fingerprint, overwrite):  # another task merged meanwhile
            return b.out_dir / MANIFEST
        records, missing = complete_parts(plan, stop=True)
        if missing:
            log.info(f"waiting for part {missing[0]} of {n_parts}, {missing[1]}: the array task that completes "
                     f"the last part merges them")
            return None
        return _finish(b, plan, records)


def _merge_built(b: Build, n_parts: int, overwrite: bool) -> Path:
    """parts=N alone: merge the N parts the array built; fail naming the first one missing, and the fix."""
    with file_lock(b.lock):
        if up_to_date(b.out_dir, b.fingerprint, overwrite):
            return b.out_dir / MANIFEST
        _, _, plan = _load(b, n_parts)
        records, missing = complete_parts(plan, stop=True)
        if missing:
            k, why = missing
            raise ValueError(f"part {k} of {n_parts} is {why}; rerun array task {k} (sbatch --array={k} "
                             f"launch/slurm/build_shards.sbatch ... parts={n_parts}, or python -m data_pipeline "
                             f"build ... parts={n_parts} part={k}) with the same arguments, then merge again")
        return _finish(b, plan, records)


def _tokenize(b: Build, docs, ends: np.ndarray, plan: Plan, records: dict, todo: list[int], since: float):
    """Tokenize parts `todo`, in order, as one stream of jobs, committing each as soon as its last chunk is in;
    their records go into `records`. Ctrl-C or an error removes only the part being written. A part's seconds
    run from the end of the one before (the first's from `since`): the time its chunks took to encode, the first
    one's included, which is in flight before any result comes back."""
    if not todo:
        return
    init_args = (b.tokenizer, plan.dtype.str, plan.n_docs, plan.n_val, b.settings["seed"])
    jobs = ((k, *job) for k in todo for job in _chunks(docs, ends, *plan.ranges[k], b.num_proc))
    meter = Meter("tokenizing", log, _text_bytes(ends, plan, todo), "B", enabled=b.progress)
    part, started, tokens, documents = None, time.time(), 0, 0
    try:
        with _encoder(b.num_proc, init_args) as encode:
            for k, result, nbytes in encode(jobs):
                if part is not None and part.k != k:
                    records[part.k], part, since = part.commit(), None, time.time()
                part = part or PartBuilder(plan, k, b.settings["shard_tokens"], b.tokenizer.vocab_size,
                                           offsets(records, k), since)
                part.add(result, nbytes)
                tokens += sum(t.size for t, _ in result.values())
                documents += sum(n for _, n in result.values())
                rate = tokens / max(time.time() - started, 1e-9)
                meter.update(nbytes, f"{documents:,} documents, {rate / 1e6:.2f}M tokens/s")
        if part is not None:
            records[part.k], part = part.commit(), None
    except BaseException:  # Ctrl-C or an error, wherever it hit: the part being written goes, the committed stay
        if part is not None:
            part.close()
        for k in todo:
            if k not in records:
                shutil.rmtree(plan.tmp(k), ignore_errors=True)
        raise
    finally:
        meter.close(complete=all(k in records for k in todo))


def _text_bytes(ends: np.ndarray, plan: Plan, todo: list[int]) -> int:
    """UTF-8 bytes of text in parts `todo` (plan.ranges: their [first, end) documents)."""
    return sum(int(ends[b - 1] - (ends[a - 1] if a else 0)) for a, b in (plan.ranges[k] for k in todo) if b > a)


def _finish(b: Build, plan: Plan, records: dict) -> Path:
    """Merge the built parts into out_dir (the caller holds b.lock), then drop the staging folder."""
    if not sum(r["splits"]["train"]["tokens"] for r in records.values()):
        shutil.rmtree(b.staging, ignore_errors=True)  # parts of blank documents are of no use to a rerun
        raise ValueError(f"{', '.join(b.files)}: every document is blank; check inputs, text_field and txt_mode")
    started, set_dir = time.time(), b.staging / "set"
    shutil.rmtree(set_dir, ignore_errors=True)  # an interrupted merge
    splits = merge_parts(plan, records, set_dir, b.settings["shard_tokens"], b.tokenizer.vocab_size)
    _write_manifest(set_dir, b, plan, records, splits, time.time() - started)
    replace(set_dir, b.out_dir)
    shutil.rmtree(b.staging)  # the parts: the shards they share with out_dir live on there (hard links)
    if len(plan.ranges) > 1:
        log.info(f"merged {len(plan.ranges)} parts into {b.out_dir}")
    return b.out_dir / MANIFEST


def _write_manifest(set_dir: Path, b: Build, plan: Plan, records: dict, splits: dict, merge_seconds: float):
    """The manifest, written last: its presence means complete. Only its time fields depend on how it was built."""
    parts = [records[k] for k in range(len(plan.ranges))]
    manifest = {
        "format_version": VERSION, "fingerprint": b.fingerprint, "created_unix": int(time.time()),
        "tokenizer": b.tokenizer.identity(), "dtype": plan.dtype.name, "vocab_size": b.tokenizer.vocab_size,
        "sources": b.sources, "settings": b.settings, "documents": plan.n_docs, "val_documents_chosen": plan.n_val,
        "input_bytes": sum(p["input_bytes"] for p in parts),
        "build_seconds": round(sum(p["seconds"] for p in parts) + merge_seconds, 3),  # all parts' time together
        "splits": splits,
    }
    tmp = set_dir / (MANIFEST + ".tmp")
    with writing(tmp):
        tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, set_dir / MANIFEST)
