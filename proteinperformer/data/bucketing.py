"""Length-bucketed batching for single-sequence mode: fewer pad tokens than plain random batches.

Each epoch: a pseudo-random permutation from ``(seed, epoch)`` (``permutation.Permutation``, computed, never
stored), cut into pools of ``pool_batches * batch_size`` examples; each pool sorted by length and cut into
batches, either of ``batch_size`` rows or, with ``toks_per_batch``, of as many rows as fit that many tokens
(rows x padded width). Consecutive batches of the sorted pools form *steps* of ``world_size`` batches, one per
rank, so the ranks of one optimizer step hold batches of similar length (none waits for a rank holding the
1024-token rows); the steps are then shuffled. Each batch is a list of ``(epoch, index)`` pairs, so the
datasets' per-example randomness is unchanged. Use as ``DataLoader(dataset, batch_sampler=...)``; DataLoader
workers then receive whole batches, disjoint by construction.

Memory: one pool at a time (plus, with ``toks_per_batch``, one int per pool for the batch counts of the epoch,
computed in one pass when the epoch starts). Nothing per example is held.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from proteinperformer.data.permutation import Permutation
from proteinperformer.data.resume import ResumableSampler


class TokenCounts:
    """Lazy ``min(lengths + specials, max_len)``: the tokens of each example, computed where indexed.

    ``lengths`` may be a memory map (a store's split index); nothing of size [N] is materialised.
    """

    def __init__(self, lengths: np.ndarray, max_len: int, specials: int = 2) -> None:
        self.lengths, self.max_len, self.specials = lengths, max_len, specials

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return np.minimum(np.asarray(self.lengths[index], dtype=np.int64) + self.specials, self.max_len)


class LengthBucketBatchSampler(ResumableSampler, Sampler):
    """Batches of ``(epoch, index)`` pairs of similar length (see the module docstring).

    ``num_tokens``: int [N] token count of each example (e.g. ``min(length + 2, max_len)``), an array or a
    :class:`TokenCounts`. ``toks_per_batch``: cut batches by token budget (rows x longest row <= budget, at
    least one row) instead of ``batch_size`` rows; ``batch_size`` then only sets the pool size.
    Without ``drop_last`` the step list is padded by wrapping so every rank gets the same number of batches
    (as ``DistributedSampler`` pads indices); with it, a partial last batch (fixed ``batch_size`` only) and
    a partial last step are dropped. Resume state (``state_dict``): the epoch and its batches consumed.
    """

    def __init__(
        self,
        num_tokens: Sequence[int] | np.ndarray | TokenCounts,
        batch_size: int,
        pool_batches: int = 100,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        toks_per_batch: int | None = None,
    ) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        if toks_per_batch is not None and toks_per_batch < 1:
            raise ValueError(f"toks_per_batch must be >= 1, got {toks_per_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.num_tokens = num_tokens if isinstance(num_tokens, TokenCounts) else np.asarray(num_tokens, np.int64)
        self.n = len(self.num_tokens)
        self.batch_size, self.pool_batches, self.seed, self.shuffle = batch_size, pool_batches, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.toks_per_batch = toks_per_batch
        self.pool_size = pool_batches * batch_size
        self.epoch = 0
        self.start = 0  # batches of this rank's epoch to skip (resume mid-epoch)
        self._pool_starts: tuple[int, np.ndarray] | None = None  # (epoch, first global batch of each pool)
        self._cached_pool: tuple[int, int, list[np.ndarray]] | None = None
        # Lightning calls set_epoch on ``batch_sampler.sampler``, never on the batch sampler itself
        # (lightning_fabric.utilities.data._set_sampler_epoch): without this handle every epoch would
        # repeat epoch 0's batches.
        self.sampler = _EpochHandle(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the batches of ``epoch`` (Lightning calls this at every epoch start)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    # ---- one pool ----------------------------------------------------------------------------------
    def _order(self) -> Permutation:
        return Permutation(self.n, self.seed * 1_000_003 + self.epoch, self.shuffle)

    def _pool(self, p: int) -> list[np.ndarray]:
        """The batches of pool ``p`` of the current epoch (sorted by length, then cut)."""
        if self._cached_pool is not None and self._cached_pool[:2] == (self.epoch, p):
            return self._cached_pool[2]
        lo = p * self.pool_size
        members = self._order()[np.arange(lo, min(self.n, lo + self.pool_size))]
        tokens = self.num_tokens[members]
        by_length = np.argsort(tokens, kind="stable")
        members, tokens = members[by_length], tokens[by_length]
        if self.toks_per_batch is None:
            cuts = np.arange(self.batch_size, len(members), self.batch_size)
        else:
            cuts = _budget_cuts(tokens, self.toks_per_batch)
        batches = np.split(members, cuts)
        self._cached_pool = (self.epoch, p, batches)
        return batches

    def _batches_per_pool(self) -> np.ndarray:
        """First global batch of every pool, int64 [pools + 1] (token budget: one pass over the epoch)."""
        n_pools = math.ceil(self.n / self.pool_size)
        if self.toks_per_batch is None:
            counts = np.full(n_pools, self.pool_batches, dtype=np.int64)
            if n_pools:
                counts[-1] = math.ceil((self.n - (n_pools - 1) * self.pool_size) / self.batch_size)
        else:
            if self._pool_starts is not None and self._pool_starts[0] == self.epoch:
                return self._pool_starts[1]
            counts = np.array([len(self._pool(p)) for p in range(n_pools)], dtype=np.int64)
        starts = np.zeros(n_pools + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        self._pool_starts = (self.epoch, starts)
        return starts

    def _batch(self, k: int, pool_starts: np.ndarray) -> np.ndarray:
        p = int(np.searchsorted(pool_starts, k, side="right")) - 1
        return self._pool(p)[k - int(pool_starts[p])]

    # ---- the epoch ---------------------------------------------------------------------------------
    def _steps(self) -> tuple[int, int, np.ndarray]:
        """(number of global batches used, steps, first global batch of every pool)."""
        pool_starts = self._batches_per_pool()
        n_batches = int(pool_starts[-1])
        if self.drop_last and self.toks_per_batch is None and self.n % self.batch_size:
            n_batches -= 1  # the partial last batch (it ends the last pool)
        steps = n_batches // self.world_size if self.drop_last else math.ceil(n_batches / self.world_size)
        return n_batches, steps, pool_starts

    def _step_batches(self, step: int, rank: int, n_batches: int, pool_starts: np.ndarray) -> np.ndarray:
        # step s holds the consecutive sorted batches s*world .. s*world + world-1; past the end, wrap around
        return self._batch((step * self.world_size + rank) % n_batches, pool_starts)

    def global_batches(self) -> list[np.ndarray]:
        """All ranks' batches of the current epoch in step order (step 0 rank 0, step 0 rank 1, ...).

        O(N) memory: for tests and statistics (``padding_fraction``), not used when iterating.
        """
        n_batches, steps, pool_starts = self._steps()
        step_order = Permutation(steps, self.seed * 1_000_003 + self.epoch + 1, self.shuffle)
        return [
            self._step_batches(int(s), r, n_batches, pool_starts)
            for s in step_order
            for r in range(self.world_size)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n_batches, steps, pool_starts = self._steps()
        step_order = Permutation(steps, self.seed * 1_000_003 + self.epoch + 1, self.shuffle)
        for chunk in step_order.chunks(self.start, steps):
            for step in chunk.tolist():
                batch = self._step_batches(step, self.rank, n_batches, pool_starts)
                yield [(self.epoch, i) for i in batch.tolist()]

    def __len__(self) -> int:
        # The whole epoch, also when resuming at ``start`` (see EpochShuffleSampler.__len__).
        return self._steps()[1]


def _budget_cuts(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Cut points of ascending ``tokens`` into batches with rows x last (= longest) row <= budget.

    Greedy from the short end, as ESM's ``get_batch_indices`` on sorted lengths. A row longer than the
    budget gets a batch of its own. Each batch end is a binary search on Python ints (the token-budget
    sampler runs this over every pool when an epoch starts, so it must cost microseconds per batch).
    """
    t = tokens.tolist()
    cuts, start, n = [], 0, len(t)
    while start < n:
        # the largest end with (end - start) * t[end - 1] <= budget: monotone in end, since t ascends
        hi = min(n, start + budget // max(t[start], 1))
        end = bisect_right(range(start + 1, hi + 1), budget, key=lambda e: (e - start) * t[e - 1]) + start
        end = max(end, start + 1)
        if end < n:
            cuts.append(end)
        start = end
    return np.array(cuts, dtype=np.int64)


class _EpochHandle:
    """Forwards ``set_epoch`` to the batch sampler that owns it."""

    def __init__(self, owner: LengthBucketBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


def padding_fraction(batches: Sequence[Sequence[int]], num_tokens: np.ndarray) -> float:
    """Share of pad tokens when each batch is padded to its longest example: 1 - real / (rows * width)."""
    num_tokens = np.asarray(num_tokens)
    real = padded = 0
    for batch in batches:
        lengths = num_tokens[np.asarray(batch, dtype=np.int64)]
        real += int(lengths.sum())
        padded += len(lengths) * int(lengths.max())
    return 1.0 - real / padded if padded else 0.0
