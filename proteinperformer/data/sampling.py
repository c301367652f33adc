"""The order in which a split's examples are batched: which sampler, chosen by the data config's keys.

- ``sampling="sequence"``: every training example once per epoch, in a fresh random order
  (:class:`~proteinperformer.data.datasets.EpochShuffleSampler`);
- ``bucketing`` / ``toks_per_batch``: the same, in batches of similar length, of ``batch_size`` rows or of up to
  ``toks_per_batch`` tokens (:class:`~proteinperformer.data.bucketing.LengthBucketBatchSampler`, mode single);
- ``packing``: flat streams of whole proteins (windows of the longer ones) up to ``toks_per_batch`` tokens, with
  either sampling (:class:`~proteinperformer.data.packing.PackedBatchSampler`);
- ``sampling="cluster"``: one member of every cluster per epoch, as ESM-2 sampled UniRef50
  (:class:`~proteinperformer.data.cluster_sampling.ClusterSampler`; a token store made with
  ``pp-preprocess --clusters``).

Evaluation always reads its split in file order, the same examples and masks at every epoch. Each training
sampler is rank-aware and owns its resume state (:mod:`proteinperformer.data.resume`).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from proteinperformer.data.bucketing import LengthBucketBatchSampler, TokenCounts
from proteinperformer.data.cluster_sampling import ClusterSampler
from proteinperformer.data.datasets import EpochShuffleSampler
from proteinperformer.data.packing import PackedBatchSampler, default_budget
from proteinperformer.data.resume import ResumableSampler
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.data.store import StoreError, StoreSequences

Split = TokenizedSequences | StoreSequences


class Sampling:
    """Builds the samplers of the splits (see the module docstring).

    Args:
        sampling: "sequence" or "cluster".
        bucketing: train batches of similar length, sorted within pools of ``pool_batches`` batches (cuts padding
            from ~50% to ~1% on UniProt).
        toks_per_batch: train batches of up to this many tokens (rows x longest row, as ESM's ``--toks_per_batch``);
            implies bucketing, and ``batch_size`` then sets only the pool size.
        pool_batches: batches per length-sorted pool.
        seed: seed of every epoch's order.
        packing: train batches are packed streams (``data/packing.py``) of up to ``toks_per_batch`` tokens (default
            ``batch_size × max_len``); replaces bucketing.
    """

    def __init__(
        self,
        sampling: str = "sequence",
        bucketing: bool = False,
        toks_per_batch: int | None = None,
        pool_batches: int = 100,
        seed: int = 0,
        packing: bool = False,
    ) -> None:
        if sampling not in ("sequence", "cluster"):
            raise ValueError(f"sampling must be 'sequence' or 'cluster', got {sampling!r}")
        if packing and bucketing:
            raise ValueError("data.packing=true packs proteins into token budgets and replaces bucketing: unset "
                             "data.bucketing (data.toks_per_batch sets the packed budget)")
        self.packing = packing
        self.bucketing = not packing and (bucketing or toks_per_batch is not None)  # budgets cut from sorted pools
        if sampling == "cluster" and self.bucketing:
            raise ValueError("data.sampling=cluster draws one member per cluster and cannot bucket by length; "
                             "unset data.bucketing and data.toks_per_batch")
        self.sampling, self.toks_per_batch, self.pool_batches, self.seed = sampling, toks_per_batch, pool_batches, seed

    def check(self, train: Split) -> None:
        """Fail early (at setup) when the training split cannot be sampled so: cluster sampling needs a split of a
        token store made with clusters."""
        if self.sampling != "cluster":
            return
        cluster_starts = getattr(train, "cluster_starts", None)
        if cluster_starts is None:
            raise ValueError("data.sampling=cluster needs a token store made with pp-preprocess --clusters "
                             "(data=uniprot_store data.store_path=...)")
        if cluster_starts() is None:
            raise StoreError(f"{train.store.path}: made without clusters, so data.sampling=cluster has none to "
                             "sample; rerun pp-preprocess with --clusters clusters.tsv (shards are reused)")

    def train_sampler(self, train: Split, dataset: Dataset, batch_size: int, rank: int = 0,
                      world_size: int = 1) -> ResumableSampler:
        """This rank's sampler of the training ``dataset`` made from split ``train``: a sampler of items
        (``items_per_batch`` = ``batch_size``) or, when bucketing or packing, of whole batches (``items_per_batch``
        None)."""
        if self.packing:
            if self.sampling == "cluster":
                self.check(train)
            starts = train.cluster_starts() if self.sampling == "cluster" else None
            budget = default_budget(self.toks_per_batch, batch_size, dataset.max_len)
            return PackedBatchSampler(train.lengths, dataset.max_len, budget, batch_size, self.pool_batches,
                                      self.seed, True, rank, world_size, cluster_starts=starts, split=train)
        if self.bucketing:  # (mode single: the data module checks)
            num_tokens = TokenCounts(train.lengths, dataset.max_len)
            return LengthBucketBatchSampler(num_tokens, batch_size, self.pool_batches, self.seed, True, rank,
                                            world_size, toks_per_batch=self.toks_per_batch)
        if self.sampling == "cluster":
            self.check(train)
            return ClusterSampler(train.cluster_starts(), self.seed, True, rank, world_size,
                                  items_per_batch=batch_size)
        return EpochShuffleSampler(len(dataset), self.seed, True, rank, world_size, items_per_batch=batch_size)

    def eval_sampler(self, dataset: Dataset, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> EpochShuffleSampler:
        """This rank's share of an evaluation ``dataset``, in order, with the epoch pinned (the same crops and masks
        at every validation)."""
        return EpochShuffleSampler(len(dataset), self.seed, False, rank, world_size, follow_epoch=False,
                                   items_per_batch=batch_size)
