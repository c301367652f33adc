"""LightningDataModule: the data parts behind Lightning's hooks.

The parts (each a small object of :mod:`proteinperformer.data`, built from the data config's ``_target_`` nodes):

- ``source`` (:mod:`.sources`): the train/valid/test sequences (a FASTA in memory, a token store, or the cached
  store of a large FASTA); ``prepare_data`` runs its one-off work on rank 0, ``setup`` asks it for the splits;
- ``examples`` (``datasets.Examples``): a split -> a Dataset (cropped sequences or fixed-size chunks);
- ``sampler`` (``sampling.Sampling``): the rank's order of the examples; the training sampler holds the resume
  state (epoch and position), which ``state_dict`` saves in every checkpoint;
- ``collator`` / ``eval_collator`` (the task, ``conf/task/*.yaml``): examples -> model inputs and labels.

Every random choice is a function of (seed, epoch, index), so runs are reproducible for any number of ranks and
DataLoader workers, and resume mid-epoch exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from proteinperformer.data.config import LOADER_KEYS, PARTS, nested_config
from proteinperformer.data.datasets import Examples
from proteinperformer.data.packing import PackedCollator
from proteinperformer.data.resume import ResumableSampler
from proteinperformer.data.sampling import Sampling
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.data.sources import SplitSource
from proteinperformer.data.store import StoreSequences
from proteinperformer.tokenizer import Alphabet

Collator = Callable[[list[dict]], dict]
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_")


class ProteinDataModule(pl.LightningDataModule):
    """Protein sequences for language-model training (see the module docstring).

    Args:
        source: the splits (``sources.FastaSource``, ``StoreSource``, ...); its ``alphabet`` is the module's.
        examples: a split -> a Dataset.
        sampler: the splits' samplers.
        collator: the training collator's class or partial, called with the alphabet (``MLMCollator``,
            ``CLMCollator``).
        eval_collator: the same for validation and test (default: ``collator``).
        batch_size: examples per batch per device (with ``toks_per_batch``: the pool size, see ``Sampling``).
        num_workers, pin_memory, persistent_workers: DataLoader options; "auto" / None choose for the trainer's
            device (``loader_options``): workers, pinned memory and persistent workers on a GPU.

    Built from a config with :meth:`from_hparams` (what ``conf/data/*.yaml`` targets), the config is kept as the
    module's hyper-parameters, which Lightning stores in every checkpoint (``datamodule_hyper_parameters``).
    """

    def __init__(
        self,
        source: SplitSource,
        examples: Examples,
        sampler: Sampling,
        collator: Callable[[Alphabet], Collator],
        eval_collator: Callable[[Alphabet], Collator] | None = None,
        batch_size: int = 16,
        num_workers: int | str = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__()
        if sampler.packing != examples.packing:
            raise ValueError("data.packing must be set for both examples and sampler (conf/data/*.yaml reads it once)")
        if sampler.bucketing and examples.mode != "single":
            raise ValueError("bucketing (and toks_per_batch) applies to mode='single' (concat chunks all have "
                             "chunk_len tokens)")
        self.source, self.examples, self.sampler = source, examples, sampler
        self.alphabet: Alphabet = source.alphabet
        self.collator = collator(self.alphabet)
        self.eval_collator = (eval_collator or collator)(self.alphabet)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prepare_data_per_node = False  # one rank builds a cached store (on a shared filesystem)
        self.splits: dict[str, TokenizedSequences | StoreSequences] = {}  # after setup: train, valid, test
        self._train_sampler: ResumableSampler | None = None
        self._resume_state: dict | None = None

    @classmethod
    def from_hparams(cls, **hparams: Any) -> ProteinDataModule:
        """Build from a data config: ``conf/data/*.yaml`` (its flat keys and its parts as ``_target_`` nodes) or a
        checkpoint's ``datamodule_hyper_parameters``, in that form or in the flat one of checkpoints written before
        the data module had parts (``config.nested_config``; unset flat keys take its defaults). A run's saved
        ``cfg.data`` (``.hydra/config.yaml``, resolved) works too, of either form: Hydra's own keys are dropped."""
        hparams = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                   for k, v in hparams.items() if k not in HYDRA_KEYS}
        config = hparams if "source" in hparams else nested_config(**hparams)
        parts = {name: hydra.utils.instantiate(config[name]) for name in PARTS}
        datamodule = cls(**parts, **{k: config[k] for k in LOADER_KEYS if k in config})
        datamodule.save_hyperparameters(config, logger=False)  # pp-evaluate re-derives the splits from it
        return datamodule

    # ---- data --------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The source's one-off work (a large FASTA's token store); Lightning runs this on rank 0 only, the other
        ranks wait, then every rank's ``setup`` reads the splits."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.source.splits()
            self.sampler.check(self.splits["train"])

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        dataset = self.examples.dataset(self.splits[split], self.alphabet, train=train)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if train:
            sampler = self.sampler.train_sampler(self.splits[split], dataset, self.batch_size, rank, world)
            if self._resume_state is not None:
                sampler.load_state_dict(self._resume_state)
                self._resume_state = None
            self._train_sampler = sampler
        else:
            sampler = self.sampler.eval_sampler(dataset, self.batch_size, rank, world)
        batching = ({"batch_sampler": sampler} if sampler.items_per_batch is None
                    else {"batch_size": sampler.items_per_batch, "sampler": sampler})
        collate = self.collator if train else self.eval_collator
        if train and self.sampler.packing:
            collate = PackedCollator(collate)  # one flat stream with cu_seqlens (data/packing.py)
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
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # ---- resume: the train sampler's state ------------------------------------------------------
    def state_dict(self) -> dict:
        """The train sampler's epoch and position, saved by Lightning in every checkpoint.

        Lightning's ``current`` batch counters run from the start of the epoch, also across resumes, and
        ``processed`` includes the batch whose ``on_train_batch_end`` is saving the checkpoint (the one
        ``every_n_train_steps`` checkpoints are written from), so it is exactly the batches consumed.
        """
        if self._train_sampler is None or self.trainer is None:
            return {}
        return self._train_sampler.state_dict(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def load_state_dict(self, state: dict) -> None:
        """Resume the next train loader at ``state`` (``ResumableSampler.load_state_dict``)."""
        self._resume_state = dict(state) if state else None
