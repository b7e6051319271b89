"""A chat shard set (chat_build.py) read as whole conversations packed into windows of seq_len + 1 tokens.

Each window holds whole conversations, longest first into the window with the least room that fits them (best fit
decreasing: a few percent of padding where fixed-stride packing would cut conversations in half), then padding.
A conversation never crosses a window, and with document masking (positions restart at each conversation's START)
attention never crosses conversations, so a conversation's loss is the same wherever it was packed. The packing
depends only on the conversations' lengths, seq_len and `overlong`, so a resumed run gets the same windows.

A conversation longer than the window is dropped or cut to the window (data.overlong=drop|truncate), and counted.
"""

import bisect
from dataclasses import dataclass

import numpy as np

from .chat import START
from .manifest import REBUILD, _check_shard_entry
from .shard_format import read_header
from .shardset import ShardSet, _scan

OVERLONG = ("drop", "truncate")


def is_chat(manifest: dict) -> bool:
    return manifest.get("format") == "chat"


class ChatShardSet(ShardSet):
    """A chat split: its token stream, the mask stream beside it (one byte a token), and its conversations."""

    def __init__(self, root, split: str, manifest: dict):
        super().__init__(root, split, manifest)
        info, where = manifest["splits"][split], f"{root}/manifest.json"
        masks = info.get("masks")
        if not isinstance(masks, list) or len(masks) != len(info["shards"]) or any(
                _check_shard_entry(m, f"splits.{split}.masks[{i}]", 1, where) != s["tokens"]
                for i, (m, s) in enumerate(zip(masks, info["shards"]))):
            raise ValueError(f"{where}: splits.{split}.masks does not match its shards one for one; {REBUILD}")
        self.masks = ShardSet(root, split, {**manifest, "dtype": "uint8", "splits": {split: {**info, "shards": masks}}})
        self.trained_tokens = int(info.get("trained_tokens", 0))
        self._starts, self._packings = None, {}

    def _check_shard(self, path, entry: dict, manifest_path, verify: bool) -> int:
        """The token shard as a text set's, and its mask shard: size always; checksum and START marks (its
        conversations) if verify."""
        super()._check_shard(path, entry, manifest_path, False)
        if verify:
            digest, top, _ = _scan(path, -1)
            if top >= self.vocab_size or digest != entry["sha256"]:
                raise ValueError(f"{path}: checksum or ids differ from {manifest_path} (corrupted); rebuild the "
                                 f"shard set")
        k = self.paths.index(path)
        mask_path, mask_entry = self.masks.paths[k], self.manifest["splits"][self.split]["masks"][k]
        header = read_header(mask_path)
        if (header["tokens"], header["bytes"]) != (mask_entry["tokens"], mask_entry["bytes"]):
            raise ValueError(f"{mask_path}: size disagrees with {manifest_path}; rebuild the shard set")
        if not verify:
            return 0
        digest, top, starts = _scan(mask_path, START)
        if top > START or digest != mask_entry["sha256"]:
            raise ValueError(f"{mask_path}: checksum or marks differ from {manifest_path} (corrupted); rebuild the "
                             f"shard set")
        return starts

    def conversation_starts(self) -> np.ndarray:
        """Each conversation's first token in the split's stream, and the stream's end: (conversations + 1,)."""
        if self._starts is None:
            found = [np.flatnonzero(self.masks._tokens(k) == START) + int(self.starts[k])
                     for k in range(len(self.paths))]
            self._starts = np.concatenate(found + [np.array([self.n_tokens])]).astype(np.int64)
        return self._starts

    def packing(self, seq_len: int, overlong: str = "drop") -> "Packing":
        key = (seq_len, overlong)
        if key not in self._packings:
            self._packings[key] = Packing(self, seq_len, overlong)
        return self._packings[key]


@dataclass
class PackStats:
    conversations: int
    dropped: int  # longer than a window, left out (overlong=drop)
    truncated: int  # longer than a window, cut to it (overlong=truncate)
    windows: int
    padding: float  # share of the windows' tokens that are padding

    def describe(self, name: str, seq_len: int, overlong: str) -> str:
        over = self.dropped + self.truncated
        verb = "dropped" if overlong == "drop" else "truncated"
        return (f"{name}: {self.conversations:,} conversations packed into {self.windows:,} windows of "
                f"{seq_len + 1} tokens ({self.padding:.1%} padding); {over:,} longer than a window were {verb}")


class Packing:
    """Windows of whole conversations: window w holds conversations members[ptr[w]:ptr[w + 1]], each `used`
    tokens long (its length, or the window's under overlong=truncate)."""

    def __init__(self, source: ChatShardSet, seq_len: int, overlong: str):
        if overlong not in OVERLONG:
            raise ValueError(f"data.overlong={overlong} is not one of {', '.join(OVERLONG)}")
        self.source, self.capacity = source, seq_len + 1
        starts = source.conversation_starts()
        self.first, lengths = starts[:-1], np.diff(starts)
        over = lengths > self.capacity
        self.used = np.minimum(lengths, self.capacity)
        keep = np.flatnonzero(~over) if overlong == "drop" else np.arange(len(lengths))
        self.ptr, self.members = best_fit_decreasing(self.used, keep, self.capacity)
        n_windows = len(self.ptr) - 1
        placed = int(self.used[self.members].sum())
        self.stats = PackStats(len(lengths), int(over.sum()) if overlong == "drop" else 0,
                               int(over.sum()) if overlong == "truncate" else 0, n_windows,
                               1 - placed / max(1, n_windows * self.capacity))

    @property
    def n(self) -> int:
        return len(self.ptr) - 1

    def read(self, windows: np.ndarray, tokens: np.ndarray, marks: np.ndarray):
        """Fill rows of tokens (B, seq_len + 1) and marks (same shape) with the windows; padding: the EOS id,
        never trained, continuing the last conversation's positions (no START)."""
        tokens.fill(max(self.source.eos_id, 0))
        marks.fill(0)
        for row, w in enumerate(np.asarray(windows).tolist()):
            at = 0
            for c in self.members[self.ptr[w]:self.ptr[w + 1]].tolist():
                n = int(self.used[c])
                self.source.read(int(self.first[c]), tokens[row, at:at + n])
                self.source.masks.read(int(self.first[c]), marks[row, at:at + n])
                at += n


def best_fit_decreasing(lengths: np.ndarray, keep: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Conversations `keep` into bins of `capacity`: longest first, each into the fullest bin it fits (a new
    one if none). Returns (ptr, members): bin b holds members[ptr[b]:ptr[b + 1]], in the order placed."""
    order = keep[np.argsort(-lengths[keep], kind="stable")]
    smallest = int(lengths[keep].min()) if len(keep) else 0
    room, bins = [], []  # sorted [(free tokens, bin)], and each bin's conversations
    for c in order.tolist():
        n = int(lengths[c])
        i = bisect.bisect_left(room, (n, -1))
        if i == len(room):
            bins.append([c])
            free, b = capacity - n, len(bins) - 1
        else:
            free, b = room.pop(i)
            bins[b].append(c)
            free -= n
        if free >= smallest:  # a bin no conversation fits any more is closed for good
            bisect.insort(room, (free, b))
    ptr = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
    members = np.array([c for b in bins for c in b], dtype=np.int64)
    return ptr, members
