"""A seeded pseudo-random permutation of ``range(n)`` evaluated at any positions, never materialised.

``torch.randperm(n)`` costs 8 bytes per item on every rank at every epoch start (2 GB for TrEMBL's 250M
sequences, before a rank keeps its 1/world share). A keyed bijection computes ``perm[positions]`` for just
the positions a rank needs, in chunks: memory O(chunk), and resuming at position p costs nothing.

Construction (as format-preserving encryption does it): a 4-round Feistel network on ``2 * half`` bits,
the smallest even bit width covering ``n`` (so the domain is < 4n), with a SplitMix64-style round function
keyed from the seed; outputs >= n are fed through the network again ("cycle walking") until they land in
``range(n)``, which keeps it a bijection on ``range(n)``. Written by hand because numpy/torch offer only
materialised permutations.
"""

from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (uint64 arrays wrap modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """``perm[positions]`` for a pseudo-random permutation ``perm`` of ``range(n)`` fixed by ``seed``.

    ``shuffle=False`` is the identity. Index with an int array (any shape) -> int64 array of the same shape.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n, self.shuffle = int(n), shuffle
        bits = max(2, (max(self.n - 1, 1)).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        state = np.random.SeedSequence(int(seed) % 2**63).generate_state(self.ROUNDS, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in state]

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right

    def __getitem__(self, positions: np.ndarray | int) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions out of range [0, {self.n})")
        if not self.shuffle:
            return pos.copy()
        shape, pos = pos.shape, pos.reshape(-1)
        x = self._encrypt(pos.astype(np.uint64))
        outside = np.flatnonzero(x >= np.uint64(self.n))
        while len(outside):  # cycle walking: the domain is < 4n, so few rounds are needed
            x[outside] = self._encrypt(x[outside])
            outside = outside[x[outside] >= np.uint64(self.n)]
        return x.astype(np.int64).reshape(shape)

    def __iter__(self):
        for chunk in self.chunks(0, self.n):
            yield from chunk.tolist()

    def chunks(self, start: int, stop: int, step: int = 1, size: int = 1 << 16):
        """Yield ``perm[start:stop:step]`` in int64 arrays of up to ``size`` items (bounded memory)."""
        for lo in range(start, stop, step * size):
            yield self[np.arange(lo, min(stop, lo + step * size), step, dtype=np.int64)]
