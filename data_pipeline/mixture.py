"""Weighted interleaving of sources: sample i -> (source, index within that source) in O(1), exactly.

A mixture may begin at a later global sample ("segment"): after a change of shard sets or weights
(continued pretraining) the new mixture starts where the old one stopped, and each set it kept goes on
from its own stream's position (an offset) instead of from its start, so none of its samples repeat.
"""

import numpy as np

PERIOD = 4096  # weights are realised exactly over every block of this many samples


class Mixture:
    """A fixed block of PERIOD slots, each source owning a quota of slots spread evenly through it."""

    def __init__(self, weights, period: int = PERIOD):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights={list(weights)} must be positive numbers, one per source")
        self.weights = w / w.sum()
        self.period = 1 if len(w) == 1 else period
        # largest-remainder rounding of the weights to integer quotas that sum to the period
        exact = self.weights * self.period
        quota = np.floor(exact).astype(np.int64)
        quota[np.argsort(quota - exact)[: self.period - quota.sum()]] += 1
        if np.any(quota == 0):
            raise ValueError(f"weights={list(weights)}: a weight below 1/{self.period} would never be sampled; "
                             f"raise it")
        self.quota = quota
        # slot order: source s's k-th slot sits at (k + 0.5) / quota[s] of the block, so sources interleave evenly
        owner = np.concatenate([np.full(q, s) for s, q in enumerate(quota)])
        rank = np.concatenate([np.arange(q) for q in quota])
        order = np.argsort((rank + 0.5) / quota[owner], kind="stable")
        self.owner, self.rank = owner[order], rank[order]
        self.begin_segment(0, np.zeros(len(quota), dtype=np.int64))

    def begin_segment(self, start: int, offsets):
        """Let this mixture own global samples from `start` on, source s's own stream starting at offsets[s]."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if start < 0 or offsets.shape != self.quota.shape or np.any(offsets < 0):
            raise ValueError(f"segment start={start}, offsets={offsets.tolist()}: need start >= 0 and one "
                             f"offset >= 0 per source ({len(self.quota)})")
        self.start, self.offsets = int(start), offsets

    def locate(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source, sample index within that source's own stream)."""
        i = np.asarray(i, dtype=np.int64) - self.start
        if i.size and i.min() < 0:
            raise ValueError(f"sample {int(i.min()) + self.start} comes before sample {self.start}, where this "
                             f"mixture begins; it belongs to the data mixture before the change")
        block, slot = np.divmod(i, self.period)
        source = self.owner[slot]
        return source, block * self.quota[source] + self.rank[slot] + self.offsets[source]

    def counts(self, n: int) -> np.ndarray:
        """How many of the global samples [start, n) (this segment's, before n) each source supplied."""
        block, slot = divmod(max(0, int(n) - self.start), self.period)
        return block * self.quota + np.bincount(self.owner[:slot], minlength=len(self.quota))

    def positions(self, n: int) -> np.ndarray:
        """Each source's own-stream position after the first n global samples: how many it has supplied in all."""
        return self.offsets + self.counts(n)


def match_streams(previous: list, identities: list[str]) -> tuple[list, list]:
    """Pair each set of a new mixture with a stream an earlier mixture left, by content identity.

    previous: [identity, position, key] per earlier stream (preferred first). Returns, per new set, its
    matched stream or None (a new set), and the earlier streams left unmatched (the dropped sets)."""
    pool = list(previous)
    matched = []
    for identity in identities:
        hit = next((p for p in pool if p[0] == identity), None)
        if hit is not None:
            pool.remove(hit)
        matched.append(hit)
    return matched, pool
