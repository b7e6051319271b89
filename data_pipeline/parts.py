"""A build in parts: ranges of documents tokenized apart (in turn on one machine, or one SLURM array task each), each
committed atomically to a folder of its own, then merged (merge.py) into the set one pass would have written.

A part holds each split's token stream of its documents [a, b) as
    <split>/head.tok     raw tokens that complete the shard the parts before it left open
    <split>/NNNNNN.bin   whole shards, numbered and written exactly as the final set's
    <split>/tail.tok     raw tokens of the shard it leaves open
when it knows its offset, the tokens of the parts before it (on one machine it always does: they are built first);
the merge then hard-links its shards into place and copies only heads and tails, less than two shards a part.
A part built while the parts before it are not (SLURM tasks run at once) does not know it: its whole stream is its
head, and the merge copies it.

Disk: on one machine the parts' shards become the set's own (hard links), so a build takes no more space than one
pass; a part that did not know its offset holds a second copy of its tokens until the merge is over.

part.json is written last and the folder then renamed into place, so a part is complete or absent. It records the
build fingerprint, the part count and the document range: a part of other inputs, settings, tokenizer or layout is
never taken for one of this build.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .disk import write_atomically, writing
from .shard_writer import ShardWriter

RECORD = "part.json"
SPLITS = ("train", "val")


def part_ranges(ends: np.ndarray, n_parts: int) -> list[tuple[int, int]]:
    """n_parts document ranges [a, b) holding about equal bytes of text, in input order (some may be empty).
    ends: cumulative text bytes of the documents. A function of the inputs and n_parts alone, so every task agrees."""
    before = ends - np.diff(ends, prepend=0)  # text bytes before each document
    targets = np.arange(1, n_parts, dtype=np.int64) * int(ends[-1]) // n_parts
    cuts = [0, *np.searchsorted(before, targets, side="left").tolist(), len(ends)]
    return list(zip(cuts, cuts[1:]))


@dataclass
class Plan:
    """What every part of one build agrees on: which build, its document count and split, the part ranges."""
    folder: Path  # <staging>/parts
    fingerprint: str
    n_docs: int
    n_val: int
    ranges: list[tuple[int, int]]
    dtype: np.dtype

    def name(self, k: int) -> str:
        return f"{k:05d}-of-{len(self.ranges):05d}"

    def path(self, k: int) -> Path:
        return self.folder / self.name(k)

    def tmp(self, k: int) -> Path:
        """Where part k is written before it is complete (a crash can leave one; the next builder of k removes it)."""
        return self.folder / f"{self.name(k)}.tmp"

    def identity(self, k: int) -> dict:
        """What part k's record must say to be a part of this build."""
        return {"fingerprint": self.fingerprint, "part": k, "parts": len(self.ranges),
                "documents": list(self.ranges[k]), "n_docs": self.n_docs, "n_val": self.n_val}


def read_part(plan: Plan, k: int) -> tuple[dict | None, str]:
    """Part k's record when it is complete and of this very build; else None and why, in words."""
    path = plan.path(k) / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"missing ({path} not found)"
    except (OSError, ValueError) as e:
        return None, f"unreadable ({path}: {e})"
    if not isinstance(record, dict) or any(record.get(key) != v for key, v in plan.identity(k).items()):
        return None, f"from another build ({path} names other inputs, settings, tokenizer or part count)"
    for split, info in record["splits"].items():
        sizes = {f"{split}/head.tok": info["head"] * plan.dtype.itemsize,
                 f"{split}/tail.tok": info["tail"] * plan.dtype.itemsize,
                 **{s["file"]: s["bytes"] for s in info["shards"]}}
        for name, size in sizes.items():
            file = plan.path(k) / name
            if not file.is_file() or file.stat().st_size != size:
                return None, f"damaged ({file} is missing or not {size} bytes)"
    return record, "complete"


def offsets(records: dict, k: int) -> dict | None:
    """Each split's tokens in parts 0..k-1 when they are all built, else None (part k cannot align its shards)."""
    if any(j not in records for j in range(k)):
        return None
    return {s: sum(records[j]["splits"][s]["tokens"] for j in range(k)) for s in SPLITS}


class SplitWriter:
    """One split of one part: head, whole shards of the final set's numbering, tail (see the module docstring)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, vocab_size: int, offset: int | None):
        self.offset, self.documents = offset, 0
        # room in the shard the parts before left open; an unknown offset: everything goes to the head
        self.head_room = (-offset) % shard_tokens if offset is not None else float("inf")
        first = -(-offset // shard_tokens) if offset is not None else 0
        self.shards = ShardWriter(folder, split, shard_tokens, vocab_size, first=first)
        self.head_path, self.tail_path = folder / split / "head.tok", folder / split / "tail.tok"
        self.head, self.head_tokens = open(self.head_path, "wb"), 0

    def add(self, tokens: np.ndarray, documents: int):
        take = int(min(self.head_room - self.head_tokens, tokens.size))
        if take:
            with writing(self.head_path):
                self.head.write(tokens[:take].tobytes())
            self.head_tokens += take
        if take < tokens.size:
            self.shards.add(tokens[take:])
        self.documents += documents

    def finish(self) -> dict:
        tail = self.shards.leftover()
        with writing(self.head_path):  # fsynced, as write_shard does the shards
            self.head.flush()
            os.fsync(self.head.fileno())
            self.head.close()
        write_atomically(self.tail_path, tail.tobytes())
        return {"offset": self.offset, "tokens": self.head_tokens + self.shards.tokens, "documents": self.documents,
                "head": self.head_tokens, "shards": self.shards.shards, "tail": int(tail.size)}

    def close(self):
        self.head.close()


class PartBuilder:
    """Part k being written: into <name>.tmp, renamed to <name> once complete (the caller is its only builder: it
    holds the part's lock, or out_dir's on one machine)."""

    def __init__(self, plan: Plan, k: int, shard_tokens: int, vocab_size: int, offsets_before: dict | None,
                 started: float | None = None):
        # started: when work on the part began (its first chunk was sent to be encoded before this is made)
        self.plan, self.k, self.started, self.input_bytes = plan, k, started or time.time(), 0
        self.tmp = plan.tmp(k)
        shutil.rmtree(self.tmp, ignore_errors=True)  # an interrupted try at this part
        self.tmp.mkdir(parents=True)
        self.splits = {s: SplitWriter(self.tmp, s, shard_tokens, vocab_size,
                                      offsets_before and offsets_before[s]) for s in SPLITS}

    def add(self, result: dict, nbytes: int):
        """One encoded chunk: {split: (tokens, documents)} and the bytes of text it came from."""
        for split, (tokens, documents) in result.items():
            self.splits[split].add(tokens, documents)
        self.input_bytes += nbytes

    def commit(self) -> dict:
        """Write part.json last and rename the folder into place; the part's record."""
        record = {**self.plan.identity(self.k), "input_bytes": self.input_bytes,
                  "seconds": round(time.time() - self.started, 3),
                  "splits": {s: w.finish() for s, w in self.splits.items()}}
        write_atomically(self.tmp / RECORD, json.dumps(record, indent=1).encode())
        final = self.plan.path(self.k)
        shutil.rmtree(final, ignore_errors=True)  # a part of another build under the same name
        self.tmp.rename(final)
        return record

    def close(self):
        for w in self.splits.values():
            w.close()


def prune(plan: Plan, keep: set[int]) -> int:
    """Remove everything in the parts folder but parts `keep` (other builds' and layouts' parts, temporaries, locks);
    the number of other parts removed."""
    names, removed = {plan.name(k) for k in keep}, 0
    for entry in sorted(plan.folder.iterdir()) if plan.folder.is_dir() else []:
        if entry.name in names:
            continue
        if entry.is_dir() and not entry.is_symlink():
            removed += (entry / RECORD).is_file()
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return removed


def complete_parts(plan: Plan, upto: int | None = None, stop: bool = False) -> tuple[dict, tuple[int, str] | None]:
    """Records of the complete parts among 0..upto-1 (all by default), and the first part that is not with why;
    stop: read no part past that one (an array task needs no more, and each read is a few files on a shared disk)."""
    records, first = {}, None
    for k in range(len(plan.ranges) if upto is None else upto):
        record, why = read_part(plan, k)
        if record is not None:
            records[k] = record
        elif first is None:
            first = (k, why)
            if stop:
                break
    return records, first
