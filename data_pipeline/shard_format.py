"""Binary token shard: a 64-byte header (magic, version, dtype, vocab size, token count), then the tokens.
A chat set's trained-token mask (data_pipeline/chat.py) is a shard of the same format: one byte a token, vocab 3."""

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from .disk import writing

MAGIC = b"LLMTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, vocab size, token count
HEADER_BYTES = 64  # header padded so the tokens start aligned
DTYPES = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return DTYPES[2] if vocab_size <= 1 << 16 else DTYPES[4]


def write_shard(path, tokens: np.ndarray, vocab_size: int, dtype: np.dtype | None = None) -> dict:
    """Write a shard (fsynced) and return what the manifest records about it; dtype: the vocabulary's, else."""
    dtype = dtype or dtype_for_vocab(vocab_size)
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, vocab_size, tokens.size).ljust(HEADER_BYTES, b"\x00")
    body = tokens.tobytes()
    with writing(path), open(path, "wb") as f:  # a full disk: one line naming the shard
        f.write(header)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    sha = hashlib.sha256(header)
    sha.update(body)
    return {"file": Path(path).name, "tokens": int(tokens.size), "bytes": HEADER_BYTES + len(body),
            "sha256": sha.hexdigest()}


def read_header(path) -> dict:
    """Parse and check a shard's header against its file size; one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard missing; rebuild the shard set (python -m data_pipeline build ...)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: truncated shard ({size} bytes, header alone is {HEADER_BYTES}); "
                         f"rebuild the shard set")
    magic, version, itemsize, vocab_size, n_tokens = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r}); rebuild the shard set")
    if version != VERSION:
        raise ValueError(f"{path}: shard format version {version}, this code reads {VERSION}; "
                         f"rebuild the shard set with this version")
    if itemsize not in DTYPES:
        raise ValueError(f"{path}: unknown token width {itemsize} bytes; rebuild the shard set")
    expected = HEADER_BYTES + n_tokens * itemsize
    if size != expected:
        raise ValueError(f"{path}: truncated or padded shard ({size} bytes, header says {expected}); "
                         f"rebuild the shard set")
    return {"dtype": DTYPES[itemsize], "vocab_size": vocab_size, "tokens": n_tokens, "bytes": size}


def file_sha256(path) -> str:
    """Hex sha256 of a whole shard file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
