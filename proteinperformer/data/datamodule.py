"""LightningDataModule: FASTA -> accession-hashed train/valid/test splits -> MLM or CLM batches.

Splits come from hashing each accession (``splits.assign_split``), so a sequence never moves between
splits when data is added or reordered. Sampling is rank-aware (``EpochShuffleSampler``) and every
random choice is a function of (seed, epoch, index), so runs are reproducible for any number of
ranks and DataLoader workers, and can resume mid-epoch (the sampler position is in ``state_dict``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from proteinperformer.data.bucketing import LengthBucketBatchSampler, TokenCounts
from proteinperformer.data.cluster_sampling import ClusterSampler
from proteinperformer.data.collate import CLMCollator, MLMCollator
from proteinperformer.data.datasets import ConcatChunkDataset, EpochShuffleSampler, SingleSequenceDataset
from proteinperformer.data.fasta import load_fasta
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.data.splits import assign_split
from proteinperformer.data.store import StoreError, TokenStore
from proteinperformer.data.store.cache import build_cached_store, cached_store_path
from proteinperformer.files import resolve_path
from proteinperformer.tokenizer import Alphabet


class ProteinDataModule(pl.LightningDataModule):
    """Protein sequences for language-model training.

    Args:
        fasta_path: FASTA (.fasta or .fasta.gz) with UniProt or plain headers.
        task: "mlm" (masked, 15% of residues, 80/10/10) or "clm" (next token).
        mode: "single" (one cropped sequence per example) or "concat" (eos-joined fixed-size chunks).
        max_len: tokens per example in single mode (specials included; the paper uses 1024).
        chunk_len: tokens per chunk in concat mode (the paper uses 8192).
        batch_size: examples per batch per device.
        valid_frac, test_frac, split_seed: accession-hash split.
        max_sequences: keep only the first N records of the file (quick experiments).
        seed: seed for shuffling, cropping and masking.
        store_path: token store made by ``pp-preprocess``; when set, the train/valid/test splits are read
            from it (memory-mapped) and fasta_path, valid_frac, test_frac, split_seed, max_sequences are unused.
        bucketing: single mode only: train batches of similar length (``LengthBucketBatchSampler``, sorted
            within pools of ``pool_batches`` batches), which cuts padding from ~50% to ~1% on UniProt.
        alphabet: the model's ``tokenizer.Alphabet`` name ("proteinperformer", or "esm" for ESM-2 models);
            token stores hold "proteinperformer" ids only.
        eval_max_len: single mode: tokens per validation/test example (default ``max_len``), so runs that
            train on different crop lengths are scored on the same windows.
        eval_mask_prob: MLM: share of residues masked in validation/test (default ``mask_prob``), so runs that
            train with different masking rates are scored on the same masks.
        toks_per_batch: single mode: train batches of up to this many tokens (rows x longest row, as ESM's
            ``--toks_per_batch``) cut from length-sorted pools (implies bucketing; ``batch_size`` then sets only
            the pool size, ``pool_batches * batch_size`` sequences). The ranks of one step get neighbouring
            batches of the same pool, so similar lengths.
        num_workers, pin_memory, persistent_workers: DataLoader options; "auto" / None choose for the trainer's
            device (``loader_options``): workers, pinned memory and persistent workers on a GPU.
        cache_dir, store_min_mb: a FASTA of at least ``store_min_mb`` MB is trained from a token store built
            once (rank 0, ``prepare_data``) into ``cache_dir`` (default ``~/.cache/proteinperformer/stores``),
            keyed by the file's path, size, mtime and the split options; smaller files are read into memory.
        sampling: "sequence" (every training sequence once per epoch) or "cluster" (a store made with
            ``pp-preprocess --clusters``: every cluster once per epoch, one member drawn at random from
            (seed, epoch, cluster), as ESM-2 sampled UniRef50 clusters).
    """

    def __init__(
        self,
        fasta_path: str = "data/uniprot_sample20k.fasta.gz",
        task: str = "mlm",
        mode: str = "single",
        max_len: int = 1024,
        chunk_len: int = 8192,
        batch_size: int = 16,
        num_workers: int | str = 0,
        valid_frac: float = 0.05,
        test_frac: float = 0.05,
        split_seed: int = 0,
        max_sequences: int | None = None,
        mask_prob: float = 0.15,
        seed: int = 0,
        store_path: str | None = None,
        bucketing: bool = False,
        pool_batches: int = 100,
        alphabet: str = "proteinperformer",
        eval_max_len: int | None = None,
        eval_mask_prob: float | None = None,
        toks_per_batch: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        sampling: str = "sequence",
        cache_dir: str | None = None,
        store_min_mb: float = 256,
    ) -> None:
        super().__init__()
        # kept in every checkpoint (``datamodule_hyper_parameters``): pp-evaluate re-derives the splits from it
        self.save_hyperparameters(logger=False)
        if task not in ("mlm", "clm"):
            raise ValueError(f"task must be 'mlm' or 'clm', got {task!r}")
        if mode not in ("single", "concat"):
            raise ValueError(f"mode must be 'single' or 'concat', got {mode!r}")
        self.fasta_path = fasta_path
        self.store_path = store_path
        self.task, self.mode = task, mode
        self.max_len, self.chunk_len = max_len, chunk_len
        # a run that trains on short crops is still validated on the same windows as every other run
        self.eval_max_len = max_len if eval_max_len is None else eval_max_len
        self.batch_size, self.num_workers = batch_size, num_workers
        self.valid_frac, self.test_frac, self.split_seed = valid_frac, test_frac, split_seed
        self.max_sequences = max_sequences
        self.seed = seed
        if toks_per_batch is not None:
            bucketing = True  # token-budget batches are cut from length-sorted pools
        if bucketing and mode != "single":
            raise ValueError("bucketing (and toks_per_batch) applies to mode='single' (concat chunks all have "
                             "chunk_len tokens)")
        self.bucketing, self.pool_batches, self.toks_per_batch = bucketing, pool_batches, toks_per_batch
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        if sampling not in ("sequence", "cluster"):
            raise ValueError(f"sampling must be 'sequence' or 'cluster', got {sampling!r}")
        if sampling == "cluster" and (store_path is None or bucketing):
            raise ValueError("data.sampling=cluster needs a token store made with pp-preprocess --clusters "
                             "(data=uniprot_store) and no bucketing / toks_per_batch")
        self.sampling = sampling
        self._store: TokenStore | None = None
        self.cache_dir, self.store_min_mb = cache_dir, store_min_mb
        self.prepare_data_per_node = False  # one rank builds a cached store (on a shared filesystem)
        self.alphabet = Alphabet(alphabet)
        if store_path is not None and alphabet != "proteinperformer":
            raise ValueError(f"{store_path}: token stores hold proteinperformer token ids, but the model uses the "
                             f"{alphabet!r} alphabet; train it from FASTA (data=fasta)")
        if task == "mlm":
            self.collator = MLMCollator(self.alphabet, mask_prob)
            # Evaluation replaces every selected residue by <mask>: with BERT's 10% "kept" targets the
            # model would score free hits by copying its input, inflating accuracy by ~10 points.
            # eval_mask_prob fixes the scored residues when runs train with different masking rates
            eval_prob = mask_prob if eval_mask_prob is None else eval_mask_prob
            self.eval_collator = MLMCollator(self.alphabet, eval_prob, mask_frac=1.0, random_frac=0.0)
        else:
            self.collator = self.eval_collator = CLMCollator(self.alphabet)
        self.splits: dict[str, TokenizedSequences] = {}
        self._train_sampler: EpochShuffleSampler | LengthBucketBatchSampler | None = None
        self._resume_state: dict | None = None
        self._baseline: dict[str, float] | None = None

    # ---- data --------------------------------------------------------------------------------
    def load_sequences(self) -> TokenizedSequences:
        """All sequences of the configured source, tokenised (errors name file, line and id)."""
        fasta = resolve_path(self.fasta_path)
        if not fasta.exists():  # the default sample is relative: present only when run from the checkout's root
            raise ValueError(f"{self.fasta_path}: no such file (a relative path is read from {Path.cwd()}); "
                             "set data.fasta_path=PATH to your sequences (.fasta or .fasta.gz)")
        records = load_fasta(fasta, self.alphabet)
        if self.max_sequences is not None:
            records = records[: self.max_sequences]
        return TokenizedSequences.from_records(records, self.alphabet)

    def cached_store(self) -> Path | None:
        """The token-store cache of a FASTA of at least ``store_min_mb`` MB (FASTA route only; not with
        ``max_sequences`` or a non-proteinperformer alphabet, which read the file into memory), else None."""
        if self.store_path is not None or self.max_sequences is not None or self.alphabet.name != "proteinperformer":
            return None
        fasta = resolve_path(self.fasta_path)
        if not fasta.is_file() or fasta.stat().st_size < self.store_min_mb * 2**20:
            return None
        return cached_store_path(fasta, self.cache_dir, self.valid_frac, self.test_frac, self.split_seed)

    def prepare_data(self) -> None:
        """Large FASTA: build (or reuse) its token store in ``cache_dir``; Lightning runs this on rank 0 only,
        the other ranks wait, then every rank's ``setup`` memory-maps it."""
        cached = self.cached_store()
        if cached is not None:
            print(f"data: {self.fasta_path} ({resolve_path(self.fasta_path).stat().st_size / 2**20:,.0f} MB) -> "
                  f"token store {cached}")
            build_cached_store(resolve_path(self.fasta_path), cached, self.valid_frac, self.test_frac,
                               self.split_seed)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        cached = self.cached_store()
        if cached is not None and not (cached / "manifest.json").exists():  # setup() without prepare_data()
            self.prepare_data()
        store_path = self.store_path if cached is None else cached
        if store_path is not None:  # pre-tokenised, accession-hashed splits made by pp-preprocess
            store = self._store = TokenStore(resolve_path(store_path))
            self.splits = {split: store.split(split) for split in ("train", "valid", "test")}
            if self.sampling == "cluster" and store.cluster_starts("train") is None:
                raise StoreError(f"{self.store_path}: made without clusters, so data.sampling=cluster has none to "
                                 "sample; rerun pp-preprocess with --clusters clusters.tsv (shards are reused)")
            return
        sequences = self.load_sequences()
        names = np.array([assign_split(i, self.valid_frac, self.test_frac, self.split_seed) for i in sequences.ids])
        for split in ("train", "valid", "test"):
            self.splits[split] = sequences.subset(np.flatnonzero(names == split))
        if len(self.splits["train"]) == 0 or len(self.splits["valid"]) == 0:
            raise ValueError(
                f"{self.fasta_path}: split gave {len(self.splits['train'])} train and {len(self.splits['valid'])} "
                "valid sequences; both must be non-empty (use more sequences or larger valid_frac)"
            )

    def dataset(self, split: str):
        """The dataset of one split ("train" crops at random; evaluation crops deterministically)."""
        sequences = self.splits[split]
        if self.mode == "concat":
            return ConcatChunkDataset(sequences, self.alphabet, self.chunk_len, seed=self.seed)
        max_len = self.max_len if split == "train" else self.eval_max_len
        return SingleSequenceDataset(sequences, self.alphabet, max_len, self.seed, random_crop=split == "train")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        collate = self.collator if split == "train" else self.eval_collator
        if split == "train" and self.bucketing:
            num_tokens = TokenCounts(self.splits[split].lengths, self.max_len)
            sampler = LengthBucketBatchSampler(num_tokens, self.batch_size, self.pool_batches, self.seed,
                                               shuffle, rank, world, toks_per_batch=self.toks_per_batch)
            batching = {"batch_sampler": sampler}
        elif split == "train" and self.sampling == "cluster":  # one member per cluster and epoch (ESM-2)
            sampler = ClusterSampler(self._store.cluster_starts("train"), self.seed, shuffle, rank, world)
            batching = {"batch_size": self.batch_size, "sampler": sampler}
        else:
            sampler = EpochShuffleSampler(len(dataset), self.seed, shuffle, rank, world, drop_last=False,
                                          follow_epoch=split == "train")  # same eval masks at every epoch
            batching = {"batch_size": self.batch_size, "sampler": sampler}
        if split == "train":
            if self._resume_state is not None:
                sampler.set_epoch(self._resume_state["epoch"])
                # EpochShuffleSampler skips examples, the bucket sampler whole batches
                sampler.start = self._resume_state["batches"] * (1 if self.bucketing else self.batch_size)
                self._resume_state = None
            self._train_sampler = sampler
        return DataLoader(dataset, **batching, collate_fn=collate, **self.loader_options())

    def loader_options(self) -> dict:
        """num_workers, pin_memory, persistent_workers with "auto" / None resolved for the trainer's device.

        On a GPU: ``num_workers="auto"`` = this rank's share of the CPUs minus one (at most 8), pinned memory
        (faster host-to-device copies) and persistent workers (no re-fork, no re-opened shards at every
        epoch and validation). On the CPU "auto" means no workers: they would compete with training for cores.
        """
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        workers = self.num_workers
        if workers == "auto":
            local = self.trainer.num_devices if self.trainer is not None else 1
            workers = min(8, max(0, len(os.sched_getaffinity(0)) // max(local, 1) - 1)) if on_gpu else 0
        workers = int(workers)
        pin = on_gpu if self.pin_memory is None else self.pin_memory
        persistent = workers > 0 if self.persistent_workers is None else self.persistent_workers and workers > 0
        return {"num_workers": workers, "pin_memory": pin, "persistent_workers": persistent}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # ---- resume: where in the epoch the train sampler stands ----------------------------------
    def state_dict(self) -> dict:
        """Epoch and position of the train sampler, saved by Lightning in every checkpoint.

        Lightning's ``current`` batch counters run from the start of the epoch, also across resumes, and
        ``processed`` includes the batch whose ``on_train_batch_end`` is saving the checkpoint (the one
        ``every_n_train_steps`` checkpoints are written from), so it is exactly the batches consumed.
        """
        if self._train_sampler is None or self.trainer is None:
            return {}
        processed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._train_sampler.epoch, "batches": processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_state = dict(state) if state else None
        if self._resume_state and "batches" not in self._resume_state:  # checkpoints before bucketing existed
            self._resume_state["batches"] = self._resume_state.pop("start") // self.batch_size

    # ---- the unigram (amino-acid frequency) baseline -----------------------------------------
    def unigram_baseline(self) -> dict[str, float]:
        """Accuracy and perplexity on validation residues of predicting from training residue frequencies.

        Frequencies over the 25 residue letters (add-one smoothing) from the train split; accuracy =
        share of valid residues equal to the most frequent one. The paper reports 9.92% / 17.80 on TrEMBL.
        """
        if self._baseline is None:
            ids = np.array(self.alphabet.residue_ids)
            # counted once by pp-preprocess for a store (manifest), in bounded chunks for FASTA
            train_counts = self.splits["train"].residue_counts(len(self.alphabet))[ids] + 1.0
            valid_counts = self.splits["valid"].residue_counts(len(self.alphabet))[ids]
            p = train_counts / train_counts.sum()
            nll = -(valid_counts * np.log(p)).sum() / valid_counts.sum()
            acc = valid_counts[np.argmax(p)] / valid_counts.sum()
            self._baseline = {"acc": float(acc), "ppl": float(math.exp(nll))}
        return self._baseline
