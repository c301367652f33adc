"""Length-bucketed batching for single-sequence mode: fewer pad tokens than plain random batches.

Each epoch: a permutation from ``(seed, epoch)``, cut into pools of ``pool_batches * batch_size`` examples;
each pool sorted by length and cut into batches; the batches shuffled. Batches are rank-sharded like
``EpochShuffleSampler`` (every rank computes the same global batch list and takes every ``world_size``-th),
and each batch is a list of ``(epoch, index)`` pairs, so the datasets' per-example randomness is unchanged.
Use as ``DataLoader(dataset, batch_sampler=LengthBucketBatchSampler(...), collate_fn=...)``; DataLoader
workers then receive whole batches, disjoint by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthBucketBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` pairs of similar length (see the module docstring).

    ``num_tokens``: int [N] token count of each example (e.g. ``min(length + 2, max_len)``).
    Without ``drop_last`` the batch list is padded by wrapping so every rank gets the same number of batches
    (as ``DistributedSampler`` pads indices); with it, the partial batch and the remainder batches are dropped.
    """

    def __init__(
        self,
        num_tokens: Sequence[int] | np.ndarray,
        batch_size: int,
        pool_batches: int = 100,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.num_tokens = np.asarray(num_tokens, dtype=np.int64)
        self.batch_size, self.pool_batches, self.seed, self.shuffle = batch_size, pool_batches, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.start = 0  # batches of this rank's epoch to skip (resume mid-epoch)
        # Lightning calls set_epoch on ``batch_sampler.sampler``, never on the batch sampler itself
        # (lightning_fabric.utilities.data._set_sampler_epoch): without this handle every epoch would
        # repeat epoch 0's batches.
        self.sampler = _EpochHandle(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the batches of ``epoch`` (Lightning calls this at every epoch start)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """All ranks' batches of the current epoch (indices into the dataset), before rank sharding."""
        n = len(self.num_tokens)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g).numpy() if self.shuffle else np.arange(n)
        pool = self.pool_batches * self.batch_size
        batches: list[np.ndarray] = []
        for lo in range(0, n, pool):
            members = order[lo : lo + pool]
            members = members[np.argsort(self.num_tokens[members], kind="stable")]
            batches.extend(members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        elif batches and len(batches) % self.world_size:
            pad = self.world_size - len(batches) % self.world_size
            batches += (batches * math.ceil(pad / len(batches)))[:pad]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches()[self.rank :: self.world_size][self.start :]:
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        # The whole epoch, also when resuming at ``start`` (see EpochShuffleSampler.__len__).
        n_batches = (
            len(self.num_tokens) // self.batch_size
            if self.drop_last
            else math.ceil(len(self.num_tokens) / self.batch_size)
        )
        return n_batches // self.world_size if self.drop_last else math.ceil(n_batches / self.world_size)


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
