"""Conversations to evaluate (llm-eval format=chat): .jsonl/.json/.parquet records of `messages` or
`prompt`/`completion`, rendered and masked as `python -m data_pipeline build ... format=chat` does
(data_pipeline/chat.py), then packed into windows as a chat shard set is (data_pipeline/packing.py): whole
conversations, best fit decreasing, a conversation longer than a window dropped or truncated. With the model's
document mask and positions restarting at each conversation's first token, each is scored as if alone, and only
its assistant turns (their content and end of turn) are labels.
"""

import numpy as np

from data_pipeline.chat import ChatEncoder, RecordError, messages_of
from data_pipeline.chat_build import load_records
from data_pipeline.loader import windows_to_batch
from data_pipeline.packing import Packing
from data_pipeline.sources import resolve_inputs


class _Stream:
    """Values read by position, as a shard's reader reads them (what Packing.read calls)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def read(self, start: int, out: np.ndarray) -> None:
        out[:] = self.values[start:start + len(out)]


class Conversations(_Stream):
    """The encoded conversations of a records source in one token stream and a mask stream beside it, as a chat
    shard set holds them, so Packing packs them exactly as it packs that set."""

    def __init__(self, encoded: list[tuple[np.ndarray, np.ndarray]], eos_id: int):
        super().__init__(np.concatenate([ids for ids, _ in encoded]))
        self.masks = _Stream(np.concatenate([mask for _, mask in encoded]))
        self.eos_id = eos_id
        self.starts = np.cumsum([0] + [len(ids) for ids, _ in encoded]).astype(np.int64)

    def conversation_starts(self) -> np.ndarray:
        return self.starts


def encode_source(spec: str, encoder: ChatEncoder) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of every record of the source's files, in order; a bad record: ValueError naming its file and
    number (1-based, as the shard builder names it)."""
    encoded = []
    for path, records in load_records(resolve_inputs([spec])):
        for number, record in enumerate(records, 1):
            try:
                encoded.append(encoder.encode(messages_of(record)))
            except RecordError as e:
                raise ValueError(f"{path}: record {number} {e}") from None
    if not encoded:
        raise ValueError(f"{spec}: holds no records; pass .jsonl/.parquet records of `messages` or "
                         f"`prompt`/`completion`")
    return encoded


def pack_source(spec: str, tok, template: str, seq_len: int, overlong: str) -> Packing:
    """The source's conversations packed into windows of seq_len + 1 tokens (its .stats count them)."""
    packing = Packing(Conversations(encode_source(spec, ChatEncoder(tok, template)), tok.eos_id), seq_len, overlong)
    if packing.n == 0:
        raise ValueError(f"{spec}: all {packing.stats.conversations:,} conversations are longer than seq_len + 1 = "
                         f"{seq_len + 1} tokens and were dropped; raise seq_len= or pass overlong=truncate")
    return packing


def chat_batches(packing: Packing, bos_id: int, seq_len: int, batch_size: int, rank: int, world: int,
                 max_batches: int | None = None):
    """This rank's rows of each global batch of the packing's windows, in order; the last batch's missing rows
    are padding with no label (every rank runs every batch: an FSDP forward needs all ranks)."""
    per_rank = batch_size // world
    n_batches = -(-packing.n // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        first = b * batch_size + rank * per_rank
        windows = np.arange(first, min(first + per_rank, packing.n))
        tokens = np.empty((per_rank, seq_len + 1), dtype=np.int64)
        marks = np.zeros(tokens.shape, dtype=np.uint8)  # rows past the last window: never trained
        tokens.fill(max(packing.source.eos_id, 0))
        packing.read(windows, tokens[:len(windows)], marks[:len(windows)])
        yield windows_to_batch(tokens, np.arange(first, first + per_rank), bos_id, True, False, marks)
