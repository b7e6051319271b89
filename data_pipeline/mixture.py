"""Weighted interleaving of sources: sample i -> (source, index within that source) in O(1), exactly."""

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

    def locate(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source, sample index within that source's own stream)."""
        block, slot = np.divmod(np.asarray(i, dtype=np.int64), self.period)
        source = self.owner[slot]
        return source, block * self.quota[source] + self.rank[slot]

    def counts(self, n: int) -> np.ndarray:
        """How many of the first n global samples each source supplied."""
        block, slot = divmod(int(n), self.period)
        return block * self.quota + np.bincount(self.owner[:slot], minlength=len(self.quota))
