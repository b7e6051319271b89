"""Builder worker: texts in, BOS+ids+EOS per document out, as flat arrays per split. Imports stay light."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .shuffle import Permutation

_state = {}  # per worker process: the tokenizer and the split rule, set once by init()


def init(tokenizer, dtype: str, n_docs: int, n_val: int, seed: int):
    """Keep the builder's Tokenizer (any format; inherited by a forked worker, loaded again by a spawned one)."""
    _state.update(tok=tokenizer, dtype=np.dtype(dtype), bos=tokenizer.bos_id, eos=tokenizer.eos_id,
                  n_val=n_val, split=Permutation(n_docs, "split", seed))


def init_process(*args):
    """Pool initializer: each worker process encodes on one thread (the processes are the parallelism; this also
    keeps `tokenizers` from warning about a fork after its thread pool was used), and not on its main thread:
    there the tokenizer's allocations share glibc's main malloc arena with Python's, which made `tokenizers`
    25-30% slower in CPU time than on a thread of its own (measured; the same with MALLOC_ARENA_MAX=1)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    init(*args)
    _state["thread"] = ThreadPoolExecutor(1)


def _encode(texts: list[str]) -> list[list[int]]:
    tok, thread = _state["tok"], _state.get("thread")
    return thread.submit(tok.encode_batch, texts, 1).result() if thread else tok.encode_batch(texts, num_threads=1)


def is_val(doc_index: np.ndarray) -> np.ndarray:
    """Document-level split: a document is validation when its permuted position is below n_val."""
    if _state["n_val"] == 0:
        return np.zeros(len(doc_index), dtype=bool)
    return _state["split"](doc_index) < _state["n_val"]


def flatten_documents(ids: list[list[int]], dtype, bos: int, eos: int) -> np.ndarray:
    """Documents' token ids -> one array BOS doc EOS BOS doc EOS ... (the shards' layout)."""
    out = np.empty(sum(map(len, ids)) + 2 * len(ids), dtype=dtype)
    pos = 0
    for x in ids:
        n = len(x)
        out[pos] = bos
        out[pos + 1:pos + 1 + n] = x
        out[pos + 1 + n] = eos
        pos += n + 2
    return out


def encode_chunk(job):
    """(first doc index, texts) -> {split: (tokens, n_documents)}, skipping blank documents."""
    start, texts = job
    s = _state
    val = is_val(np.arange(start, start + len(texts)))
    out = {}
    for split, mask in (("train", ~val), ("val", val)):
        chosen = [t for t, m in zip(texts, mask) if m and t.strip()]
        ids = _encode(chosen) if chosen else []
        out[split] = (flatten_documents(ids, s["dtype"], s["bos"], s["eos"]), len(chosen))
    return out
