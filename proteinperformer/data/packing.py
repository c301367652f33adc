"""Packed batches (``data.packing=true``): flat token streams of whole proteins up to a token budget.

A training batch is one stream of tokens (1, T ≤ ``toks_per_batch``) holding proteins back to back, each framed
``<cls> residues <eos>`` as ``tokenizer.BatchConverter`` frames it, and ``cu_seqlens`` (n + 1,) int32, their
offsets (the layout of flash-attention's varlen functions). The model computes each protein alone
(``PerformerLM.forward(tokens, cu_seqlens=...)``): no pad token is computed and no token attends across proteins,
unlike ``data.mode=concat`` (the paper's setting), whose chunks run attention across protein boundaries.

- ``datasets.ProteinWindows``: a protein longer than the crop (``data.max_len`` tokens, framed) is cut into equal
  windows of at most ``max_len`` tokens that cover it exactly (``<cls>`` in the first, ``<eos>`` in the last), each
  packed as a document of its own; ``data.max_len=null`` packs whole proteins. Every residue of the split is
  trained on once per epoch (the sampler logs the count).
- :class:`PackedBatchSampler`: each epoch, pools of ``pool_batches × batch_size`` proteins (a fresh order from
  ``(seed, epoch)``, or one member per cluster with ``sampling=cluster``) are cut into windows and packed into
  steps of ``world_size`` near-full batches of nearly equal tokens (:func:`pack_balanced`: the ranks of a step are
  balanced by tokens); pools and steps are visited in orders drawn from ``(seed, epoch)``, and the sampler owns its
  resume position (:mod:`~proteinperformer.data.resume`).
- :class:`PackedCollator`: the task's collator (MLM masking, CLM shift) applied to each window alone, the
  results joined, so a packed batch holds exactly the inputs and labels each protein gets in a batch of its own.

Memory: one pool at a time; nothing per protein of the corpus is held (lengths stay memory-mapped).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from proteinperformer.data.bucketing import _EpochHandle
from proteinperformer.data.cluster_sampling import draw_members
from proteinperformer.data.datasets import window_counts, window_key
from proteinperformer.data.permutation import Permutation
from proteinperformer.data.resume import ResumableSampler

log = logging.getLogger(__name__)

def protein_name(split, index: int) -> str:
    """``index`` and, where the split has them, the accession: for error messages."""
    store = getattr(split, "store", None)
    try:
        name = store.accessions(split.rows[[index]])[0] if store is not None else split.ids[index]
    except (AttributeError, IndexError, TypeError):
        return f"#{index}"
    return f"#{index} ({name})"


def pack_balanced(sizes: Sequence[int], budget: int, world_size: int = 1, fill: float = 0.98) -> list[list[list[int]]]:
    """Positions of ``sizes`` (each ≤ ``budget``) packed into steps of ``world_size`` bins of at most ``budget``.

    Worst-fit decreasing on a fixed number of bins: every item, largest first, goes to the emptiest bin, so all
    bins end with nearly the same total (the ranks of a step wait for none). The number of bins starts at what
    ``fill`` × ``budget`` allows and grows by a step (and the pack restarts) while an item fits nowhere. Steps
    hold bins of similar totals.
    """
    order = np.argsort(-np.asarray(sizes, dtype=np.int64), kind="stable").tolist()  # largest first, ties in order
    sizes = [int(x) for x in sizes]
    ordered = [sizes[i] for i in order]
    n_bins = world_size * max(1, math.ceil(sum(sizes) / (world_size * budget * fill)))
    replace = heapq.heapreplace
    while True:
        # the heap holds one int per bin, load << shift | bin: ordered as (load, bin) pairs, without the tuples
        shift = n_bins.bit_length()
        heap, low = list(range(n_bins)), (1 << shift) - 1  # every load 0: a heap already
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        for item, size in zip(order, ordered, strict=True):
            key = heap[0]  # the emptiest bin
            if (key >> shift) + size > budget:
                break
            replace(heap, key + (size << shift))
            bins[key & low].append(item)
        else:
            break
        n_bins += world_size  # an item fit nowhere: one more step
    loads = {key & low: key >> shift for key in heap}
    bins = [bins[b] for b in sorted(range(n_bins), key=lambda b: -loads[b])]
    return [bins[i: i + world_size] for i in range(0, n_bins, world_size)]


class PackedBatchSampler(ResumableSampler, Sampler):
    """Batches of ``(epoch, window_key)`` pairs packed up to ``toks_per_batch`` tokens (see the module docstring).

    Each pool of the epoch is packed into steps of ``world_size`` batches of nearly equal tokens
    (:func:`pack_balanced`), so every rank has the same number of batches and nothing is repeated or dropped.
    The epoch visits the pools in an order drawn from ``(seed, epoch)`` and each pool's steps in a drawn order;
    resume state (``state_dict``) is the epoch and its batches consumed, as for every training sampler. When an
    epoch starts, one pass packs every pool to count the batches (``__len__``) and residues (logged).

    Args:
        lengths: int [N] residues per protein of the split (a memory map is fine).
        max_len: the crop (window) in tokens, or None (whole proteins).
        toks_per_batch: the token budget of a batch.
        batch_size, pool_batches: a pool holds ``batch_size × pool_batches`` proteins.
        cluster_starts: with ``sampling=cluster``, the split's cluster starts: a pool is a run of clusters of the
            epoch's cluster order, one member each (``cluster_sampling.draw_members``).
        split: the split, for naming a protein in errors.
    Raises ValueError (``error:`` in ``pp-train``) naming the setting to change: a budget below the crop, or,
    without a crop, a protein longer than the budget.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        max_len: int | None,
        toks_per_batch: int,
        batch_size: int = 16,
        pool_batches: int = 100,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        cluster_starts: np.ndarray | None = None,
        split=None,
    ) -> None:
        check_budget(lengths, max_len, toks_per_batch, split)
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.lengths, self.max_len, self.toks_per_batch = lengths, max_len, int(toks_per_batch)
        self.cluster_starts = cluster_starts
        self.n = len(lengths) if cluster_starts is None else len(cluster_starts) - 1
        self.pool_size = batch_size * pool_batches
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.start = 0, 0  # start: batches of this rank's epoch to skip (resume)
        self._cached_pool: tuple[int, int, list, tuple[int, int]] | None = None
        self._counts: tuple[int, np.ndarray, dict] | None = None  # (epoch, steps per pool, epoch totals)
        self._logged_epoch: int | None = None
        self.sampler = _EpochHandle(self)  # Lightning calls set_epoch on batch_sampler.sampler

    def set_epoch(self, epoch: int) -> None:
        """Select the batches of ``epoch`` (Lightning calls this at every epoch start)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def _key(self, salt: int) -> int:
        return self.seed * 1_000_003 + self.epoch + salt

    def _members(self, p: int) -> np.ndarray:
        """Protein indices of pool ``p`` of the epoch."""
        lo = p * self.pool_size
        order = Permutation(self.n, self._key(0), self.shuffle)[np.arange(lo, min(self.n, lo + self.pool_size))]
        if self.cluster_starts is None:
            return order
        return draw_members(self.cluster_starts, order, self.seed, self.epoch)

    def _windows(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window keys and token counts of ``members``' windows, int64 each."""
        framed = np.asarray(self.lengths[members], dtype=np.int64) + 2
        counts = window_counts(framed, self.max_len)
        window = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        f, c = np.repeat(framed, counts), np.repeat(counts, counts)
        return window_key(np.repeat(members, counts), window), (window + 1) * f // c - window * f // c

    def _pool(self, p: int) -> list[list[np.ndarray]]:
        """Pool ``p``'s steps: ``world_size`` arrays of window keys each."""
        if self._cached_pool is not None and self._cached_pool[:2] == (self.epoch, p):
            return self._cached_pool[2]
        members = self._members(p)
        keys, sizes = self._windows(members)
        steps = [[keys[np.asarray(b, dtype=np.int64)] for b in step]
                 for step in pack_balanced(sizes.tolist(), self.toks_per_batch, self.world_size)]
        for step in steps:  # fewer windows than ranks (a tiny last pool): a rank repeats one, as DistributedSampler
            for r, batch in enumerate(step):
                if not len(batch):
                    step[r] = step[0][-1:]
        self._cached_pool = (self.epoch, p, steps, (len(members), int(sizes.sum())))  # + proteins, framed tokens
        return steps

    def _epoch(self) -> tuple[np.ndarray, dict]:
        """Steps per pool and the epoch's totals (one pass over the pools, once per epoch)."""
        if self._counts is not None and self._counts[0] == self.epoch:
            return self._counts[1], self._counts[2]
        n_pools = math.ceil(self.n / self.pool_size)
        steps = np.zeros(n_pools, dtype=np.int64)
        totals = {"epoch": self.epoch, "proteins": 0, "windows": 0, "batches": 0, "tokens": 0}
        for p in range(n_pools):
            pool = self._pool(p)
            proteins, tokens = self._cached_pool[3]  # the windows cover the framed proteins exactly
            steps[p] = len(pool)
            totals["proteins"] += proteins
            totals["tokens"] += tokens
            totals["windows"] += sum(len(b) for step in pool for b in step)
            totals["batches"] += len(pool) * self.world_size
        totals["residues"] = totals["tokens"] - 2 * totals["proteins"]
        self._counts = (self.epoch, steps, totals)
        return steps, totals

    def epoch_counts(self) -> dict[str, int]:
        """The epoch's proteins, windows, batches (all ranks), tokens and residues: every window of every protein
        drawn is in exactly one batch, so ``residues`` is the sum of the split's lengths (sequence sampling)."""
        return dict(self._epoch()[1])

    def batches(self, rank: int | None = None) -> list[np.ndarray]:
        """Rank ``rank``'s (default: this rank's) batches of the epoch in order, window keys each (for tests)."""
        rank = self.rank if rank is None else rank
        return [self._pool(p)[s][rank] for p, s in self._order_of_steps(0)]

    def _order_of_steps(self, skip: int):
        steps, _ = self._epoch()
        for p in Permutation(len(steps), self._key(1), self.shuffle)[np.arange(len(steps))].tolist():
            if skip >= steps[p]:
                skip -= int(steps[p])
                continue
            order = Permutation(int(steps[p]), self._key(2 + p), self.shuffle)
            for s in order[np.arange(skip, int(steps[p]))].tolist():
                yield p, s
            skip = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.rank == 0 and self._logged_epoch != self.epoch:
            self._logged_epoch = self.epoch
            c = self.epoch_counts()
            log.info("packing: epoch %d trains %d residues of %d proteins (%d windows) in %d batches of <= %d tokens",
                     c["epoch"], c["residues"], c["proteins"], c["windows"], c["batches"], self.toks_per_batch)
        for p, s in self._order_of_steps(self.start):
            yield [(self.epoch, k) for k in self._pool(p)[s][self.rank].tolist()]

    def __len__(self) -> int:
        # the whole epoch on this rank, also when resuming (see EpochShuffleSampler.__len__)
        return int(self._epoch()[0].sum())


def check_budget(lengths: np.ndarray, max_len: int | None, toks_per_batch: int, split=None) -> None:
    """ValueError naming the setting to change when a window cannot fit the budget (see PackedBatchSampler)."""
    if toks_per_batch < 1:
        raise ValueError(f"data.toks_per_batch must be >= 1, got {toks_per_batch}")
    if max_len is not None:
        if toks_per_batch < max_len:
            raise ValueError(f"data.toks_per_batch={toks_per_batch} is smaller than the longest crop "
                             f"data.max_len={max_len}: raise data.toks_per_batch or lower data.max_len")
        return
    longest, at = 0, 0
    for lo in range(0, len(lengths), 1 << 20):  # streamed over a memory map
        chunk = np.asarray(lengths[lo: lo + (1 << 20)])
        if len(chunk) and int(chunk.max()) > longest:
            longest, at = int(chunk.max()), lo + int(chunk.argmax())
    if longest + 2 > toks_per_batch:
        raise ValueError(f"protein {protein_name(split, at)} of the training split has {longest + 2} tokens, more "
                         f"than data.toks_per_batch={toks_per_batch} with cropping off (data.max_len=null): raise "
                         "data.toks_per_batch or set data.max_len to cut long proteins into windows")


class PackedCollator:
    """Joins windows into one stream: the task's collator (``MLMCollator``, ``CLMCollator``) on each window alone,
    concatenated. Returns ``input_ids``, ``labels`` [1, T], ``padding_mask`` bool [1, T] (all False) and
    ``cu_seqlens`` int32 [n + 1] (a CLM window of L tokens gives L − 1 inputs, as in a padded batch)."""

    def __init__(self, collator: Callable[[list[dict]], dict]) -> None:
        self.collator = collator

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        parts = [self.collator([item]) for item in items]
        out = {name: torch.cat([p[name] for p in parts], dim=1) for name in ("input_ids", "labels", "padding_mask")}
        lengths = torch.tensor([p["input_ids"].shape[1] for p in parts], dtype=torch.int32)
        out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
        return out


def default_budget(toks_per_batch: int | None, batch_size: int, max_len: int | None) -> int:
    """The token budget of a packed batch: ``data.toks_per_batch``, else ``batch_size × max_len`` tokens."""
    if toks_per_batch is not None:
        return int(toks_per_batch)
    if max_len is None:
        raise ValueError("data.packing=true with cropping off (data.max_len=null) needs a token budget: set "
                         "data.toks_per_batch")
    return int(batch_size) * int(max_len)

