"""Builder worker: texts in, BOS+ids+EOS per document out, as flat arrays per split. Imports stay light."""

import numpy as np
import sentencepiece as spm

from .shuffle import Permutation

_state = {}  # per worker process: the processor and the split rule, set once by init()


def init(model_path: str, dtype: str, n_docs: int, n_val: int, seed: int):
    """Load the tokenizer once per process."""
    sp = spm.SentencePieceProcessor()
    sp.Load(model_path)
    _state.update(sp=sp, dtype=np.dtype(dtype), bos=sp.bos_id(), eos=sp.eos_id(),
                  n_val=n_val, split=Permutation(n_docs, "split", seed))


def is_val(doc_index: np.ndarray) -> np.ndarray:
    """Document-level split: a document is validation when its permuted position is below n_val."""
    if _state["n_val"] == 0:
        return np.zeros(len(doc_index), dtype=bool)
    return _state["split"](doc_index) < _state["n_val"]


def _flatten(ids: list[list[int]], dtype, bos: int, eos: int) -> np.ndarray:
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
        ids = s["sp"].Encode(chosen, num_threads=1) if chosen else []  # one thread: processes give parallelism
        out[split] = (_flatten(ids, s["dtype"], s["bos"], s["eos"]), len(chosen))
    return out
