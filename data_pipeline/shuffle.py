"""A keyed pseudo-random bijection of [0, n): shuffled order in O(1) memory, vectorised."""

import hashlib

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast 64-bit hash (uint64 arithmetic wraps, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def derive_key(*parts) -> int:
    """A 64-bit key from any ints/strings, stable across runs and platforms."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Permutation:
    """Balanced Feistel network on 2^(2h) >= n values with cycle-walking back into [0, n)."""

    def __init__(self, n: int, *key_parts):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2  # the domain 4^half is < 4n, so cycle-walking takes < 4 steps on average
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(derive_key("feistel", r, *key_parts)) for r in range(ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << h) | right

    def __call__(self, idx) -> np.ndarray:
        """The images of idx (array of ints in [0, n)) under the permutation."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.n <= 1:
            return np.zeros_like(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        out = self._feistel(idx.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle-walking: re-apply until the value lands inside [0, n)
            out[outside] = self._feistel(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)
