"""The data config in its flat form (the keys users override) and the nested one that builds the data module.

``conf/data/*.yaml`` holds both: the flat keys at the top (``data.max_len``, ``data.mode``, ...) and the parts
(``source``, ``examples``, ``sampler``, and from ``conf/task/*.yaml`` ``collator`` / ``eval_collator``) as
``_target_`` nodes that read them. Checkpoints written before the data module had parts hold only the flat keys
(``datamodule_hyper_parameters``); :func:`nested_config` makes the parts from them as the YAML does
(``tests/test_data.py`` checks that the two agree), so such checkpoints, and Python callers that give flat keys,
build the same data module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from proteinperformer.data.collate import CLMCollator, MLMCollator
from proteinperformer.data.datasets import Examples
from proteinperformer.data.sampling import Sampling
from proteinperformer.data.sources import FastaSource, StoreSource

PARTS = ("source", "examples", "sampler", "collator", "eval_collator")
LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers")


def _target(cls: Callable) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class FlatDataConfig:
    """The flat data config; defaults as the data module's constructor had them before it had parts.

    fasta_path: FASTA (.fasta or .fasta.gz) with UniProt or plain headers.
    task: "mlm" (masked, ``mask_prob`` of residues, 80/10/10) or "clm" (next token).
    mode, max_len, eval_max_len, chunk_len, seed: how a split becomes examples (``datasets.Examples``).
    batch_size, num_workers, pin_memory, persistent_workers: the DataLoaders' (``ProteinDataModule``).
    valid_frac, test_frac, split_seed, max_sequences, cache_dir, store_min_mb: a FASTA's splits
        (``sources.FastaSource``); unused with ``store_path`` (``sources.StoreSource``).
    mask_prob, eval_mask_prob: MLM masking in training and in validation/test (default ``mask_prob``).
    bucketing, pool_batches, toks_per_batch, sampling, packing: the training order (``sampling.Sampling``;
        ``packing``: ``data/packing.py``).
    alphabet: the model's ``tokenizer.Alphabet`` name or token list.
    """

    fasta_path: str | None = "data/uniprot_sample20k.fasta.gz"
    task: str = "mlm"
    mode: str = "single"
    max_len: int = 1024
    chunk_len: int = 8192
    batch_size: int = 16
    num_workers: int | str = 0
    valid_frac: float = 0.05
    test_frac: float = 0.05
    split_seed: int = 0
    max_sequences: int | None = None
    mask_prob: float = 0.15
    seed: int = 0
    store_path: str | None = None
    bucketing: bool = False
    pool_batches: int = 100
    alphabet: str | Sequence[str] = "proteinperformer"
    eval_max_len: int | None = None
    eval_mask_prob: float | None = None
    toks_per_batch: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    sampling: str = "sequence"
    cache_dir: str | None = None
    store_min_mb: float = 256
    packing: bool = False

    def parts(self) -> dict[str, dict[str, Any]]:
        """The ``_target_`` nodes of the parts, as ``conf/data/*.yaml`` and ``conf/task/*.yaml`` write them."""
        if self.store_path is not None:
            source = {"_target_": _target(StoreSource), "path": self.store_path, "alphabet": self.alphabet}
        else:
            source = {"_target_": _target(FastaSource), "path": self.fasta_path, "alphabet": self.alphabet,
                      "valid_frac": self.valid_frac, "test_frac": self.test_frac, "split_seed": self.split_seed,
                      "max_sequences": self.max_sequences, "cache_dir": self.cache_dir,
                      "store_min_mb": self.store_min_mb}
        examples = {"_target_": _target(Examples), "mode": self.mode, "max_len": self.max_len,
                    "eval_max_len": self.max_len if self.eval_max_len is None else self.eval_max_len,
                    "chunk_len": self.chunk_len, "seed": self.seed, "packing": self.packing}
        sampler = {"_target_": _target(Sampling), "sampling": self.sampling, "bucketing": self.bucketing,
                   "toks_per_batch": self.toks_per_batch, "pool_batches": self.pool_batches, "seed": self.seed,
                   "packing": self.packing}
        if self.task == "mlm":
            eval_prob = self.mask_prob if self.eval_mask_prob is None else self.eval_mask_prob
            collator = {"_target_": _target(MLMCollator), "_partial_": True, "mask_prob": self.mask_prob}
            eval_collator = {"_target_": _target(MLMCollator.for_evaluation), "_partial_": True,
                             "mask_prob": eval_prob}
        elif self.task == "clm":
            collator = eval_collator = {"_target_": _target(CLMCollator), "_partial_": True}
        else:
            raise ValueError(f"task must be 'mlm' or 'clm', got {self.task!r}")
        return {"source": source, "examples": examples, "sampler": sampler, "collator": collator,
                "eval_collator": dict(eval_collator)}


def nested_config(**flat: Any) -> dict[str, Any]:
    """A flat data config (unset keys: ``FlatDataConfig``'s defaults) as the nested one: its keys plus the parts."""
    config = FlatDataConfig(**flat)
    return {**asdict(config), **config.parts()}
