"""ESM-2-style cluster sampling: each epoch visits every cluster once and draws one of its members.

The split's rows are grouped by cluster (``pp-preprocess --clusters``): cluster ``c`` holds dataset indices
``starts[c] .. starts[c + 1] - 1``. Epoch ``e`` is a permutation of the clusters from ``(seed, e)``, sharded
by rank like :class:`~proteinperformer.data.datasets.EpochShuffleSampler`, and the member drawn from cluster
``c`` is a function of ``(seed, e, c)``: the same on every rank, worker and resume. Memory: the memory-mapped
cluster starts (8 bytes per cluster, on disk); indices are computed a chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from proteinperformer.data.permutation import Permutation, _mix
from proteinperformer.data.resume import ResumableSampler


def draw_members(starts: np.ndarray, clusters: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """int64 dataset index of the member drawn from each of ``clusters`` in ``epoch`` (uniform per cluster)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    first = np.asarray(starts[clusters], dtype=np.int64)
    size = np.asarray(starts[clusters + 1], dtype=np.int64) - first
    key = np.uint64((seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) % 2**64)
    u = _mix(clusters.astype(np.uint64) ^ key)
    return first + (u % size.astype(np.uint64)).astype(np.int64)


class ClusterSampler(ResumableSampler, Sampler):
    """Yields ``(epoch, index)``: one member of every cluster per epoch, clusters shuffled and rank-sharded.

    ``cluster_starts``: int64 [C + 1] (``StoreSequences.cluster_starts``). Epoch length, padding by wrapping
    and ``start`` (resume) as in ``EpochShuffleSampler``, counted in clusters; ``items_per_batch``: the
    DataLoader's batch size, for the resume state (``state_dict``: epoch and batches consumed).
    """

    CHUNK = 1 << 16

    def __init__(
        self,
        cluster_starts: np.ndarray,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        items_per_batch: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.items_per_batch = items_per_batch
        self.starts = cluster_starts
        self.clusters = len(cluster_starts) - 1
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = len(self)
        total = per_rank * self.world_size
        order = Permutation(self.clusters, self.seed * 1_000_003 + self.epoch, self.shuffle)
        for lo in range(self.rank + self.start * self.world_size, total, self.world_size * self.CHUNK):
            positions = np.arange(lo, min(total, lo + self.world_size * self.CHUNK), self.world_size)
            clusters = order[positions % self.clusters]
            for index in draw_members(self.starts, clusters, self.seed, self.epoch).tolist():
                yield (self.epoch, index)

    def __len__(self) -> int:
        return self.clusters // self.world_size if self.drop_last else math.ceil(self.clusters / self.world_size)
