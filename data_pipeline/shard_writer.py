"""One split's token stream cut into shard files of exactly shard_tokens tokens (the last one shorter)."""

import os
import shutil
from pathlib import Path

import numpy as np

from .disk import writing
from .shard_format import write_shard

READ_TOKENS = 1 << 24  # tokens read at a time from a part's raw stream: bounded memory, few calls


class ShardWriter:
    """Writes out_dir/<split>/NNNNNN.bin, numbered from `first` (a part's shards carry the final set's numbers)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int, first: int = 0,
                 suffix: str = ".bin", dtype: np.dtype | None = None):
        self.dir, self.split, self.shard_tokens, self.vocab_size = out_dir / split, split, shard_tokens, vocab_size
        self.suffix, self.dtype = suffix, dtype  # a chat set's masks: NNNNNN.mask.bin, one byte a token
        self.dir.mkdir(parents=True, exist_ok=True)
        self.first = first
        self.pending, self.pending_tokens = [], 0
        self.shards, self.tokens, self.documents = [], 0, 0

    def add(self, tokens: np.ndarray, documents: int = 0):
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        self.tokens += tokens.size
        self.documents += documents
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:self.shard_tokens])
            self.pending, self.pending_tokens = [stream[self.shard_tokens:]], stream.size - self.shard_tokens

    def add_file(self, path: Path, dtype: np.dtype):
        """Append a raw token file (a part's head or tail), read a block at a time."""
        with open(path, "rb") as f:
            while (block := np.fromfile(f, dtype=dtype, count=READ_TOKENS)).size:
                self.add(block)

    def add_shard(self, path: Path, entry: dict):
        """Append a finished shard of this very set (an aligned part's): hard-linked into place, not copied."""
        name = f"{self.split}/{self.first + len(self.shards):06d}.bin"
        assert self.pending_tokens == 0 and entry["file"] == name, f"{path} is not shard {name} of the set"
        _link(path, self.dir.parent / name)
        self.shards.append(entry)
        self.tokens += entry["tokens"]

    def _write(self, tokens: np.ndarray):
        entry = write_shard(self.dir / f"{self.first + len(self.shards):06d}{self.suffix}", tokens, self.vocab_size,
                            self.dtype)
        entry["file"] = f"{self.split}/{entry['file']}"
        self.shards.append(entry)

    def leftover(self) -> np.ndarray:
        """The tokens of the shard still open (fewer than shard_tokens), which a part leaves to the next one."""
        return np.concatenate(self.pending) if self.pending else np.empty(0, dtype=np.uint16)

    def finish(self) -> dict:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _link(src: Path, dst: Path):
    """dst as a second name of src (no copy, no extra disk); a copy where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        with writing(dst):
            shutil.copyfile(src, dst)
