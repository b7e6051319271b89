"""One split of a built shard set: validated on open, read as one memory-mapped token stream."""

import collections
import hashlib
import json
import mmap
from pathlib import Path

import numpy as np

from .manifest import REBUILD, check_split, read_manifest
from .shard_format import HEADER_BYTES, read_header

MAX_OPEN_SHARDS = 64  # each mapping holds a file descriptor; least recently used ones are closed
PAGE = mmap.PAGESIZE
FAULT_AROUND = 1 << 16  # Linux maps up to 64 KiB around a faulting page (fault_around_bytes)


def _scan(path, bos_id: int) -> tuple[str, int, int]:
    """sha256 of a shard file, its largest token id and its BOS count (documents), in one sequential pass."""
    header = read_header(path)
    h, top, bos = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        h.update(f.read(HEADER_BYTES))
        for block in iter(lambda: f.read(1 << 24), b""):  # 16 MiB: a multiple of both token widths
            h.update(block)
            tokens = np.frombuffer(block, dtype=header["dtype"])
            top = max(top, int(tokens.max()))
            bos += int(np.count_nonzero(tokens == bos_id))
    return h.hexdigest(), top, bos


def split_identity(manifest: dict, split: str) -> str:
    """sha256 of what defines a split's tokens (its shards' checksums and token counts in order, and the
    tokenizer), not of where the folder lies: a copied or moved shard set keeps its identity."""
    shards = [[s["sha256"], int(s["tokens"])] for s in manifest["splits"][split]["shards"]]
    blob = json.dumps({"tokenizer": manifest["tokenizer"]["sha256"], "shards": shards})
    return hashlib.sha256(blob.encode()).hexdigest()


class ShardSet:
    """Tokens of one split (train/val), concatenated across shards in manifest order."""

    def __init__(self, root: Path, split: str, manifest: dict):
        self.root, self.split, self.manifest = root, split, manifest
        info = manifest["splits"][split]
        self.paths = [root / s["file"] for s in info["shards"]]
        self.n_tokens, self.n_documents = int(info["tokens"]), int(info["documents"])
        self.starts = np.cumsum([0] + [s["tokens"] for s in info["shards"]]).astype(np.int64)
        tok = manifest["tokenizer"]
        self.vocab_size, self.bos_id, self.eos_id, self.tokenizer_sha256 = (
            tok["vocab_size"], tok["bos_id"], tok["eos_id"], tok["sha256"])
        self.dtype = np.dtype(manifest["dtype"])
        self.name = f"{root}:{split}"
        self.identity = split_identity(manifest, split)  # content, not path: what a checkpoint matches sets by
        self._maps = collections.OrderedDict()  # shard index -> (mmap, token view)

    @classmethod
    def open(cls, out_dir, split: str = "train", expect_tokenizer_sha256: str | None = None,
             verify: bool = True) -> "ShardSet":
        """Open and check a split: the manifest's counts against its shards, the header and size of every shard
        always; checksums, ids and documents if verify. SplitAbsent (a ValueError) when the split is empty."""
        root = Path(out_dir)
        manifest_path = root / "manifest.json"
        manifest = read_manifest(manifest_path, root)
        check_split(manifest, split, manifest_path)
        sha = manifest["tokenizer"]["sha256"]
        if expect_tokenizer_sha256 and sha != expect_tokenizer_sha256:
            raise ValueError(f"{manifest_path}: built with tokenizer {sha[:12]} ({manifest['tokenizer'].get('path')}), "
                             f"configured tokenizer is {expect_tokenizer_sha256[:12]}; rebuild the shards with it "
                             f"or configure the tokenizer they were built with")
        if cls is ShardSet and manifest.get("format") == "chat":  # conversations with trained-token masks
            from .packing import ChatShardSet
            cls = ChatShardSet
        shards = cls(root, split, manifest)
        documents = sum(shards._check_shard(path, entry, manifest_path, verify)
                        for path, entry in zip(shards.paths, manifest["splits"][split]["shards"]))
        if verify and documents != shards.n_documents:  # every document starts with the one BOS it holds
            raise ValueError(f"{manifest_path}: splits.{split}.documents is {shards.n_documents:,} but its shards hold "
                             f"{documents:,} documents; {REBUILD}")
        return shards

    def _check_shard(self, path: Path, entry: dict, manifest_path: Path, verify: bool) -> int:
        """One shard against its manifest entry: header and size always; ids and checksum if verify.
        Returns the documents that start in it when verifying (else 0)."""
        header = read_header(path)
        if (header["tokens"], header["bytes"]) != (entry["tokens"], entry["bytes"]) \
                or header["vocab_size"] != self.vocab_size or header["dtype"] != self.dtype:
            raise ValueError(f"{path}: header/size ({header['tokens']} tokens, {header['bytes']} bytes) disagree "
                             f"with {manifest_path} ({entry['tokens']}, {entry['bytes']}); rebuild the shard set")
        if not verify:
            return 0
        digest, top, bos = _scan(path, self.bos_id)
        if top >= self.vocab_size:  # before the checksum: the more specific diagnosis
            raise ValueError(f"{path}: token id {top} >= vocab size {self.vocab_size}; rebuild the shard set "
                             f"with the tokenizer it names")
        if digest != entry["sha256"]:
            raise ValueError(f"{path}: checksum differs from {manifest_path} (corrupted); rebuild the shard set")
        return bos

    def n_windows(self, seq_len: int) -> int:
        """Windows of seq_len + 1 tokens at stride seq_len: every token is a label exactly once per epoch."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def _tokens(self, shard: int) -> np.ndarray:
        """A shard's tokens, memory-mapped (kept in a small LRU so file descriptors stay bounded)."""
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard][1]
        if len(self._maps) >= MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)  # unmapped (and its descriptor closed) once no view remains
        with open(self.paths[shard], "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(m, dtype=self.dtype, offset=HEADER_BYTES)
        self._maps[shard] = (m, view)
        return view

    def read(self, start: int, out: np.ndarray):
        """Copy tokens [start, start + len(out)) of the split's stream into out, crossing shards as needed."""
        pos, filled = start, 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < len(out):
            tokens = self._tokens(shard)
            lo = pos - int(self.starts[shard])
            n = min(len(out) - filled, len(tokens) - lo)
            out[filled:filled + n] = tokens[lo:lo + n]
            # unmap the pages just read (they stay in the page cache) so resident memory stays flat; the
            # margin covers the neighbours the kernel's fault-around mapped in with them
            m = self._maps[shard][0]
            first = max(0, HEADER_BYTES + lo * self.dtype.itemsize - FAULT_AROUND) // PAGE * PAGE
            end = min(len(m), HEADER_BYTES + (lo + n) * self.dtype.itemsize + FAULT_AROUND)
            m.madvise(mmap.MADV_DONTNEED, first, end - first)
            filled, pos, shard = filled + n, pos + n, shard + 1

    def shard_of(self, position: int) -> Path:
        """The shard file holding a stream position (for error messages)."""
        return self.paths[int(np.searchsorted(self.starts, position, side="right")) - 1]

    def close(self):
        """Drop all mappings."""
        self._maps.clear()
