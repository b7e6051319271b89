"""Shards to batches: a seeded global sample order, split across data-parallel ranks, resumable from a few ints.

A resume may change the mixture (continued pretraining, `allow_change=True`): the new mixture begins where
the old one stopped, and each shard set it keeps, matched by content identity, continues its own stream
under its own permutation, so none of its samples repeats until its epoch wraps; new sets start at 0.
"""

import numpy as np
import torch

from .chat import START, TRAINED
from .mixture import Mixture, match_streams
from .packing import ChatShardSet, Packing
from .shardset import ShardSet
from .shuffle import Permutation

__all__ = ["ShardSet", "TokenLoader", "validation_batches"]

IGNORE_INDEX = -100  # a label the cross-entropy skips (model/loss.py)


def _check_layout(global_batch_size: int, dp_rank: int, dp_size: int):
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if global_batch_size < 1 or global_batch_size % dp_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of dp_size={dp_size}")


def _check_windows(source: ShardSet, seq_len: int, packing: Packing | None = None) -> int:
    if packing is not None:
        if packing.n == 0:
            raise ValueError(f"{source.name}: all {packing.stats.conversations:,} conversations are longer than "
                             f"seq_len + 1 = {seq_len + 1} tokens and were dropped; raise data.seq_len or pass "
                             f"data.overlong=truncate")
        return packing.n
    n = source.n_windows(seq_len) if seq_len >= 1 else 0
    if n == 0:
        raise ValueError(f"{source.name}: {source.n_tokens} tokens cannot fill one window of seq_len + 1 = "
                         f"{seq_len + 1}; lower seq_len or add data")
    return n


def packings(sources: list[ShardSet], seq_len: int, overlong: str) -> list[Packing | None]:
    """Each chat set's packing into windows (None for a text set); a mix of the two kinds is refused."""
    chat = [isinstance(s, ChatShardSet) for s in sources]
    if any(chat) and not all(chat):
        text, conv = sources[chat.index(False)], sources[chat.index(True)]
        raise ValueError(f"{text.name} holds text and {conv.name} conversations: a run trains on one kind; build "
                         f"both with the same format (python -m data_pipeline build ... format=chat|text)")
    return [s.packing(seq_len, overlong) if c else None for s, c in zip(sources, chat)]


def _read(source: ShardSet, packing: Packing | None, windows: np.ndarray, seq_len: int):
    """Rows of tokens (B, seq_len + 1) of the windows, and a chat set's marks (the same shape; else None)."""
    tokens = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    if packing is None:
        _read_windows(source, windows, seq_len, tokens)
        return tokens, None
    marks = np.empty_like(tokens, dtype=np.uint8)
    packing.read(windows, tokens, marks)
    _check_ids(source, tokens, lambda row: source.shard_of(int(packing.first[packing.members[
        packing.ptr[windows[row]]]])))
    return tokens, marks


def _read_windows(source: ShardSet, windows: np.ndarray, seq_len: int, out: np.ndarray):
    """Fill out's rows with windows (seq_len + 1 tokens at stride seq_len) and check their ids."""
    for row, w in zip(out, windows.tolist()):
        source.read(w * seq_len, row)
    _check_ids(source, out, lambda row: source.shard_of(int(windows[row]) * seq_len))


def _check_ids(source: ShardSet, out: np.ndarray, shard_of_row):
    if len(out) and out.max() >= source.vocab_size:  # cheap, so corrupt ids are caught even without verify
        row = int(np.argmax(out.max(axis=1)))
        raise ValueError(f"{shard_of_row(row)}: token id {int(out[row].max())} >= vocab size {source.vocab_size}; "
                         f"rebuild the shard set")


def _check_documents(source: ShardSet):
    """Per-document positions (and the document mask built from them) find documents by their BOS."""
    if source.bos_id is None or source.bos_id < 0:
        raise ValueError(f"{source.name}: its tokenizer has no BOS token, so documents cannot be told apart; set "
                         f"data.document_masking=false and data.document_positions=false, or rebuild the shards "
                         f"with a tokenizer that has one")
    if source.n_documents == 0:
        raise ValueError(f"{source.name}: no BOS markers (0 documents in its manifest), so documents cannot be told "
                         f"apart; set data.document_masking=false and data.document_positions=false, or rebuild "
                         f"the shards with python -m data_pipeline build")


def windows_to_batch(tokens: np.ndarray, sample_index: np.ndarray, bos_id: int, return_positions: bool,
                     mask_boundary_loss: bool = False, marks: np.ndarray | None = None) -> dict:
    """Windows of seq_len + 1 tokens -> inputs, labels shifted by one, and (optionally) per-document positions.
    mask_boundary_loss ignores the labels that are a BOS: which document comes next cannot be predicted.
    marks (a chat window's, same shape as tokens): only TRAINED tokens are labels, and documents (conversations)
    start at the START marks rather than at a BOS."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if mask_boundary_loss:
        labels = np.where(labels == bos_id, IGNORE_INDEX, labels)
    if marks is not None:
        labels = np.where(marks[:, 1:] == TRAINED, labels, IGNORE_INDEX)
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
             "labels": torch.from_numpy(np.ascontiguousarray(labels)),
             "sample_index": torch.from_numpy(np.asarray(sample_index, dtype=np.int64))}
    if return_positions or marks is not None:
        steps = np.arange(inputs.shape[1], dtype=np.int64)
        starts = inputs == bos_id if marks is None else marks[:, :-1] == START
        last_start = np.maximum.accumulate(np.where(starts, steps, 0), axis=1)
        batch["position_ids"] = torch.from_numpy(steps - last_start)  # 0 at every document's first token
    return batch


class TokenLoader:
    """Endless iterator of batches; global sample i is a function of (seed, i), rank r takes its slice of a step."""

    def __init__(self, sources, *, seq_len: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, weights=None, return_positions: bool = False, mask_boundary_loss: bool = False,
                 overlong: str = "drop", adaptive: bool = False):
        self.sources = [sources] if isinstance(sources, ShardSet) else list(sources)
        if not self.sources:
            raise ValueError("sources is empty; pass one or more ShardSet")
        _check_layout(global_batch_size, dp_rank, dp_size)
        self.seq_len, self.global_batch_size, self.dp_rank, self.dp_size = seq_len, global_batch_size, dp_rank, dp_size
        self.seed, self.return_positions, self.mask_boundary_loss = seed, return_positions, mask_boundary_loss
        self.packings = packings(self.sources, seq_len, overlong)  # chat sets: whole conversations per window
        self.overlong = overlong if self.packings[0] is not None else None  # it decides a chat set's windows
        if (return_positions or mask_boundary_loss) and self.packings[0] is None:
            for s in self.sources:
                _check_documents(s)
        self.n_windows = [_check_windows(s, seq_len, p) for s, p in zip(self.sources, self.packings)]
        if weights is None:  # natural mixture: in proportion to size
            weights = self.n_windows
        if len(weights) != len(self.sources):
            raise ValueError(f"weights has {len(weights)} entries for {len(self.sources)} sources; give one per source")
        self.mixture = Mixture(weights)
        # adaptive: the weights move during the run (set_weights), so a resume takes the saved ones, not these
        self.adaptive = adaptive
        self.identities = [s.identity for s in self.sources]
        # Each source's permutation key [seed, index]: a set kept through a mixture change keeps its old key,
        # so its windows come in the same order wherever it now sits in the list and whatever the seed now is.
        self.keys = [[self.seed, s] for s in range(len(self.sources))]
        self.dropped = []  # [identity, position, key] of sets an earlier change left out: they resume if re-added
        self.samples_consumed = 0
        self._perms = {}

    def _permutation(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = Permutation(self.n_windows[source], "windows", *self.keys[source], epoch)
        return self._perms[key]

    def locate(self, sample_index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample indices -> (source, epoch of that source, window) arrays."""
        sample_index = np.asarray(sample_index, dtype=np.int64)
        source, k = self.mixture.locate(sample_index)  # k: the index in source's own stream
        n = np.asarray(self.n_windows, dtype=np.int64)[source]
        epoch, j = k // n, k % n  # each source cycles on its own; a new epoch gets a new permutation
        window = np.empty_like(j)
        for s, e in set(zip(source.tolist(), epoch.tolist())):
            rows = (source == s) & (epoch == e)
            window[rows] = self._permutation(s, e)(j[rows])
        return source, epoch, window

    def samples(self, sample_index) -> dict:
        """The batch holding the given global samples, in that order."""
        sample_index = np.asarray(sample_index, dtype=np.int64)
        source, _, window = self.locate(sample_index)
        tokens = np.empty((len(sample_index), self.seq_len + 1), dtype=np.int64)
        marks = None if self.packings[0] is None else np.empty(tokens.shape, dtype=np.uint8)
        for s in np.unique(source).tolist():
            rows = np.flatnonzero(source == s)
            tokens[rows], part_marks = _read(self.sources[s], self.packings[s], window[rows], self.seq_len)
            if marks is not None:
                marks[rows] = part_marks
        return windows_to_batch(tokens, sample_index, self.sources[0].bos_id, self.return_positions,
                                self.mask_boundary_loss, marks)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        per_rank = self.global_batch_size // self.dp_size
        first = self.samples_consumed + self.dp_rank * per_rank
        batch = self.samples(np.arange(first, first + per_rank))
        self.samples_consumed += self.global_batch_size  # global: every rank advances by the whole step
        return batch

    @property
    def epoch(self) -> int:
        """Epoch of the first source at the next sample (the only one for a single shard set)."""
        return int(self.mixture.positions(self.samples_consumed)[0] // self.n_windows[0])

    def data_identity(self) -> dict:
        """What defines the stream's content: shard set identities in order, normalised weights, seed."""
        return {"sources": list(self.identities), "weights": [float(w) for w in self.mixture.weights],
                "seed": self.seed}

    def state_dict(self) -> dict:
        """Global stream position: the same on every rank, valid for any dp_size; JSON-serialisable."""
        return {"samples_consumed": self.samples_consumed, "epoch": self.epoch, "seed": self.seed,
                "seq_len": self.seq_len, "windows": sum(self.n_windows), **self.data_identity(),
                "segment_start": self.mixture.start, "segment_offsets": self.mixture.offsets.tolist(),
                "positions": self.mixture.positions(self.samples_consumed).tolist(),
                "permutation_keys": [list(k) for k in self.keys], "dropped": [list(d) for d in self.dropped],
                **({"overlong": self.overlong} if self.overlong else {})}

    def load_state_dict(self, state: dict, allow_change: bool = False) -> str | None:
        """Continue the stream where the state left it (the saved seed wins). A state for other shard sets or
        weights is refused unless allow_change, which starts a new mixture at the saved position with every
        kept set continuing its own stream; that returns a one-line description of the change to log."""
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"loader state is for seq_len={state['seq_len']}, this loader has seq_len="
                             f"{self.seq_len}; resume with the same seq_len")
        if state.get("overlong") != self.overlong:  # other windows, even where their number happens to agree
            raise ValueError(f"loader state is for data.overlong={state.get('overlong')}, this loader has "
                             f"data.overlong={self.overlong}; resume with the same data.overlong")
        if "sources" not in state:  # saved before shard sets had identities: only an unchanged mixture resumes
            return self._load_unchanged(state)
        if self.adaptive and state["sources"] == self.identities:  # the weights in force when it was saved
            self.mixture = Mixture(state["weights"])
        same = state["sources"] == self.identities and np.allclose(state["weights"], self.mixture.weights,
                                                                   rtol=1e-9, atol=0)
        if same and (not allow_change or int(state["seed"]) == self.seed):
            return self._load_unchanged(state)
        if not allow_change:
            raise ValueError(f"loader state is for shard sets {_short(state['sources'])} with weights "
                             f"{_fmt(state['weights'])}, this loader has {_short(self.identities)} with "
                             f"{_fmt(self.mixture.weights)}; resume with the same data.shards and data.weights, "
                             f"or pass data.allow_change=true to continue each kept set where it stopped")
        return self._change_mixture(state)

    def _load_unchanged(self, state: dict) -> None:
        """The same mixture: restore its position, segment, permutation keys and seed exactly."""
        if state["windows"] != sum(self.n_windows):
            why = "" if "sources" in state else " (the state predates shard-set identities, so it cannot change)"
            raise ValueError(f"loader state is for {state['windows']} windows, this loader has "
                             f"{sum(self.n_windows)}; resume with the same shard sets{why}")
        self.seed, self.samples_consumed = int(state["seed"]), int(state["samples_consumed"])
        default_keys = [[self.seed, s] for s in range(len(self.sources))]
        self.keys = [[int(a), int(b)] for a, b in state.get("permutation_keys", default_keys)]
        self.dropped = [[d, int(p), [int(a), int(b)]] for d, p, (a, b) in state.get("dropped", [])]
        self.mixture.begin_segment(int(state.get("segment_start", 0)),
                                   state.get("segment_offsets", [0] * len(self.sources)))
        self._perms.clear()

    def _change_mixture(self, state: dict) -> str:
        """A new segment at the saved position: kept sets go on from their saved positions and keys, new
        ones start at 0 with a fresh key; the seed is this loader's (it only keys the new sets)."""
        # per earlier stream: [identity, position, permutation key, weight (None: dropped by an earlier change)]
        saved = [[d, int(p), [int(a), int(b)], float(w)] for d, p, (a, b), w in
                 zip(state["sources"], state["positions"], state["permutation_keys"], state["weights"])]
        earlier = [[d, int(p), [int(a), int(b)], None] for d, p, (a, b) in state["dropped"]]
        matched, unmatched = match_streams(saved + earlier, self.identities)
        self.samples_consumed = int(state["samples_consumed"])
        self.keys = [m[2] if m else [self.seed, s] for s, m in enumerate(matched)]
        self.dropped = [u[:3] for u in unmatched]
        self.mixture.begin_segment(self.samples_consumed, [m[1] if m else 0 for m in matched])
        self._perms.clear()
        return self._describe_change(state, matched, unmatched)

    def _describe_change(self, state: dict, matched: list, unmatched: list) -> str:
        """One line for the log: where each set of the new mixture starts, which sets left, the weights."""
        parts = []
        for src, m, w, n in zip(self.sources, matched, self.mixture.weights, self.n_windows):
            if m is None:
                parts.append(f"added {src.name} [{src.identity[:12]}] from its start, weight {w:.4g}")
            else:
                was = "" if m[3] is None else f"{m[3]:.4g} -> "
                parts.append(f"kept {src.name} [{src.identity[:12]}] at its sample {m[1]} (epoch {m[1] // n}), "
                             f"weight {was}{w:.4g}")
        parts += [f"dropped [{u[0][:12]}] at its sample {u[1]}" for u in unmatched if u[3] is not None]
        if int(state["seed"]) != self.seed:
            parts.append(f"seed {state['seed']} -> {self.seed} (orders the added sets only)")
        return f"data mixture changed at global sample {self.samples_consumed}: " + "; ".join(parts)

    def set_weights(self, weights) -> str:
        """Sample with `weights` from the next global sample on: a new mixture segment there, each source going on
        in its own stream (same permutation) where it stopped, so none repeats a sample within its epoch. Returns a
        one-line description (old -> new weights)."""
        positions = self.mixture.positions(self.samples_consumed)
        old = self.mixture.weights
        self.mixture = Mixture(weights)
        self.mixture.begin_segment(self.samples_consumed, positions)
        changes = ", ".join(f"{s.name} {a:.4g} -> {b:.4g}" for s, a, b in zip(self.sources, old, self.mixture.weights))
        return f"data mixture weights from global sample {self.samples_consumed}: {changes}"

    def mixture_proportions(self) -> dict:
        """Per source: target weight, realised share of this mixture's samples so far (since the last change),
        samples taken from it in all (its own-stream position) and its epoch."""
        counts = self.mixture.counts(self.samples_consumed)
        positions = self.mixture.positions(self.samples_consumed)
        total = max(1, int(counts.sum()))
        return {s.name: {"weight": float(w), "realised": int(c) / total, "samples": int(p), "epoch": int(p // n)}
                for s, w, c, p, n in zip(self.sources, self.mixture.weights, counts, positions, self.n_windows)}


def _short(identities) -> str:
    return "[" + ", ".join(i[:12] for i in identities) + "]"


def _fmt(weights) -> str:
    return "[" + ", ".join(f"{float(w):.4g}" for w in weights) + "]"


def validation_batches(shardset: ShardSet, seq_len: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                       max_batches: int | None = None, return_positions: bool = False,
                       mask_boundary_loss: bool = False, overlong: str = "drop"):
    """Un-shuffled windows in order; batch_size is global, rank r takes rows [r*b/W, (r+1)*b/W) of each batch."""
    _check_layout(batch_size, dp_rank, dp_size)
    packing = packings([shardset], seq_len, overlong)[0]
    if (return_positions or mask_boundary_loss) and packing is None:
        _check_documents(shardset)
    n_windows = _check_windows(shardset, seq_len, packing)
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise ValueError(f"{shardset.name}: {n_windows} windows of seq_len + 1 = {seq_len + 1} "
                         f"tokens cannot fill one batch of {batch_size}; lower batch_size or raise val_fraction")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    per_rank = batch_size // dp_size
    for b in range(n_batches):
        windows = np.arange(b * batch_size + dp_rank * per_rank, b * batch_size + (dp_rank + 1) * per_rank)
        tokens, marks = _read(shardset, packing, windows, seq_len)
        yield windows_to_batch(tokens, windows, shardset.bos_id, return_positions, mask_boundary_loss, marks)
