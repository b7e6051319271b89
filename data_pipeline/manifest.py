"""Reading a shard set's manifest.json and checking that what it claims adds up, before any token is read.

The loader trusts the manifest's counts (a split's token total decides which windows exist), so a total that
disagrees with its shards would read past the last shard or silently leave data out: refuse it in one line.
"""

import json
import re
from pathlib import Path, PurePosixPath

from .shard_format import HEADER_BYTES, VERSION, dtype_for_vocab

REBUILD = "restore the manifest or rebuild the shard set (python -m data_pipeline build ... overwrite=true)"
SHA256 = re.compile(r"[0-9a-f]{64}")
MIN_DOCUMENT_TOKENS = 3  # BOS, at least one token (blank documents are skipped), EOS


class SplitAbsent(ValueError):
    """The manifest has no tokens for this split (e.g. no validation split was built)."""


def read_manifest(manifest_path: Path, root: Path) -> dict:
    """The parsed manifest of a finished build in this code's format version, its top-level claims checked."""
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest (missing or unfinished build); "
                                f"run `python -m data_pipeline build ... out_dir={root}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest_path}: unreadable manifest ({e}); rebuild the shard set") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{manifest_path}: format version {version}, this code reads {VERSION}; rebuild the shard set")
    _check_tokenizer(manifest, manifest_path)
    return manifest


def _field(record: dict, key: str, kind: type, where: str, manifest_path: Path):
    """record[key] if it is a kind (a non-negative one for ints), else a one-line error naming where it is."""
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
        wanted = "count" if kind is int else kind.__name__
        raise ValueError(f"{manifest_path}: {where}.{key} is {value!r}, not a {wanted}; {REBUILD}")
    return value


def _check_tokenizer(manifest: dict, manifest_path: Path):
    """The tokenizer fields every reader uses, and a token width that fits its vocabulary."""
    tok = _field(manifest, "tokenizer", dict, "manifest", manifest_path)
    for key in ("vocab_size", "bos_id", "eos_id"):
        _field(tok, key, int, "tokenizer", manifest_path)
    _field(tok, "sha256", str, "tokenizer", manifest_path)
    dtype = _field(manifest, "dtype", str, "manifest", manifest_path)
    if dtype != dtype_for_vocab(tok["vocab_size"]).name:
        raise ValueError(f"{manifest_path}: dtype is {dtype!r} but tokenizer.vocab_size {tok['vocab_size']} is "
                         f"written as {dtype_for_vocab(tok['vocab_size']).name}; {REBUILD}")
    _field(manifest, "splits", dict, "manifest", manifest_path)


def _check_shard_entry(entry: dict, where: str, itemsize: int, manifest_path: Path) -> int:
    """One shard's entry: a file inside the set, a token count its byte size agrees with, a sha256; its tokens."""
    file = _field(entry, "file", str, where, manifest_path)
    if PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
        raise ValueError(f"{manifest_path}: {where}.file {file!r} lies outside the shard set; {REBUILD}")
    tokens = _field(entry, "tokens", int, where, manifest_path)
    if _field(entry, "bytes", int, where, manifest_path) != HEADER_BYTES + tokens * itemsize:
        raise ValueError(f"{manifest_path}: {where} claims {tokens} tokens in {entry['bytes']} bytes, which a "
                         f"{itemsize}-byte token width cannot hold; {REBUILD}")
    if not SHA256.fullmatch(_field(entry, "sha256", str, where, manifest_path)):
        raise ValueError(f"{manifest_path}: {where}.sha256 is not a sha256; {REBUILD}")
    return tokens


def check_split(manifest: dict, split: str, manifest_path: Path) -> dict:
    """A split's entry, its totals checked against its shards' entries (which the shard headers are checked
    against on open); SplitAbsent when the split has no tokens."""
    if split not in manifest["splits"]:
        raise SplitAbsent(f"{manifest_path}: split {split!r} is empty or absent; "
                          f"build with val_fraction/val_docs > 0 or use split=train")
    where = f"splits.{split}"
    info = _field(manifest["splits"], split, dict, "splits", manifest_path)
    shards = _field(info, "shards", list, where, manifest_path)
    itemsize = dtype_for_vocab(manifest["tokenizer"]["vocab_size"]).itemsize
    held = sum(_check_shard_entry(s, f"{where}.shards[{i}]", itemsize, manifest_path) for i, s in enumerate(shards))
    tokens, documents = (_field(info, key, int, where, manifest_path) for key in ("tokens", "documents"))
    if tokens != held:
        raise ValueError(f"{manifest_path}: {where}.tokens is {tokens:,} but its shards ({len(shards)}) hold "
                         f"{held:,}; {REBUILD}")
    if documents * MIN_DOCUMENT_TOKENS > tokens:
        raise ValueError(f"{manifest_path}: {where}.documents is {documents:,}, more than {tokens:,} tokens can "
                         f"hold; {REBUILD}")
    if tokens == 0:
        raise SplitAbsent(f"{manifest_path}: split {split!r} is empty or absent; "
                          f"build with val_fraction/val_docs > 0 or use split=train")
    return info
