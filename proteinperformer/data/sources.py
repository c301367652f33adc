"""Where the train/valid/test sequences come from: a FASTA file, a token store, or a store built from a FASTA.

A source has ``alphabet`` (the tokenizer its sequences are encoded with), ``prepare()`` (work to do once per run
before the ranks set up: Lightning runs it on rank 0 only) and ``splits()`` -> ``{"train", "valid", "test"}``
sequences with the ``TokenizedSequences`` interface (``len``, ``[i]``, ``lengths``, ``ids``, ``residue_counts``).

- :class:`FastaSource`: a FASTA file read into memory (``fasta.py``'s reader) and split by accession hash
  (``splits.assign_split``); a file of at least ``store_min_mb`` MB is trained from its :class:`CachedStoreSource`
  instead, since reading it into memory would cost ~3 KB per sequence on every rank.
- :class:`StoreSource`: a token store made by ``pp-preprocess`` (memory-mapped; its splits were fixed there).
- :class:`CachedStoreSource`: the token store of a large FASTA, built once by ``pp-preprocess`` into ``cache_dir``
  and reused while the file (path, size, mtime) and the split options are unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.data.splits import SPLITS, assign_split
from proteinperformer.data.store import StoreSequences, TokenStore
from proteinperformer.data.store.cache import build_cached_store, cached_store_path
from proteinperformer.files import resolve_path
from proteinperformer.tokenizer import Alphabet

log = logging.getLogger(__name__)


class SplitSource(Protocol):
    """What the data module asks of a source (see the module docstring)."""

    alphabet: Alphabet

    def prepare(self) -> None: ...

    def splits(self) -> dict[str, TokenizedSequences | StoreSequences]: ...


class StoreSource:
    """The splits of a token store made by ``pp-preprocess`` (``path``: the store directory).

    Stores hold proteinperformer token ids, so ``alphabet`` (the model's) must be "proteinperformer".
    """

    def __init__(self, path: str | Path, alphabet: str | Sequence[str] = "proteinperformer") -> None:
        self.path = path
        self.alphabet = Alphabet(alphabet)
        if self.alphabet.name != "proteinperformer":
            raise ValueError(f"{path}: token stores hold proteinperformer token ids, but the model uses the "
                             f"{alphabet!r} alphabet; train it from FASTA (data=fasta)")

    def prepare(self) -> None:
        """Nothing to do: the store was made beforehand."""

    def splits(self) -> dict[str, StoreSequences]:
        store = TokenStore(resolve_path(self.path))
        return {split: store.split(split) for split in SPLITS}


class CachedStoreSource(StoreSource):
    """The token store of FASTA ``fasta`` with an accession-hash split, built once into ``cache_dir`` (default
    ``~/.cache/proteinperformer/stores``) under a key of the file and the split options."""

    def __init__(self, fasta: str | Path, cache_dir: str | Path | None = None, valid_frac: float = 0.05,
                 test_frac: float = 0.05, split_seed: int = 0) -> None:
        self.fasta = resolve_path(fasta)
        self.split_options = (valid_frac, test_frac, split_seed)
        super().__init__(cached_store_path(self.fasta, cache_dir, valid_frac, test_frac, split_seed))

    def prepare(self) -> None:
        """Build (or finish, or reuse) the store."""
        log.info("data: %s (%.0f MB) -> token store %s", self.fasta, self.fasta.stat().st_size / 2**20, self.path)
        build_cached_store(self.fasta, Path(self.path), *self.split_options)

    def splits(self) -> dict[str, StoreSequences]:
        if not (Path(self.path) / "manifest.json").exists():  # setup() without prepare_data()
            self.prepare()
        return super().splits()


class FastaSource:
    """A FASTA file (plain or gzip) split by accession hash into train/valid/test.

    Args:
        path: the FASTA file (a relative path is read from the current directory).
        alphabet: the model's ``tokenizer.Alphabet`` name ("proteinperformer", or "esm" for ESM-2 models) or
            token list.
        valid_frac, test_frac, split_seed: the accession-hash split (``splits.assign_split``).
        max_sequences: keep only the first N records (quick experiments; always read into memory).
        cache_dir, store_min_mb: a file of at least ``store_min_mb`` MB is trained from its token store in
            ``cache_dir`` (:class:`CachedStoreSource`, proteinperformer alphabet and no ``max_sequences`` only).
    """

    def __init__(
        self,
        path: str | Path = "data/uniprot_sample20k.fasta.gz",
        alphabet: str | Sequence[str] = "proteinperformer",
        valid_frac: float = 0.05,
        test_frac: float = 0.05,
        split_seed: int = 0,
        max_sequences: int | None = None,
        cache_dir: str | Path | None = None,
        store_min_mb: float = 256,
    ) -> None:
        assign_split("", valid_frac, test_frac, split_seed)  # validates the fractions
        self.path, self.alphabet = path, Alphabet(alphabet)
        self.valid_frac, self.test_frac, self.split_seed = valid_frac, test_frac, split_seed
        self.max_sequences, self.cache_dir, self.store_min_mb = max_sequences, cache_dir, store_min_mb

    def cached_store(self) -> CachedStoreSource | None:
        """The token-store route of a file of at least ``store_min_mb`` MB, else None (read into memory)."""
        if self.max_sequences is not None or self.alphabet.name != "proteinperformer":
            return None
        fasta = resolve_path(self.path)
        if not fasta.is_file() or fasta.stat().st_size < self.store_min_mb * 2**20:
            return None
        return CachedStoreSource(fasta, self.cache_dir, self.valid_frac, self.test_frac, self.split_seed)

    def prepare(self) -> None:
        """A large file: build (or reuse) its token store."""
        cached = self.cached_store()
        if cached is not None:
            cached.prepare()

    def sequences(self) -> TokenizedSequences:
        """The file's records tokenised in memory (the first ``max_sequences``); bad input raises a one-line
        FastaFormatError naming file and line, worded as ``pp-preprocess`` words it."""
        sequences = TokenizedSequences.from_fasta(resolve_path(self.path), self.alphabet)
        return sequences if self.max_sequences is None else sequences.head(self.max_sequences)

    def splits(self) -> dict[str, TokenizedSequences | StoreSequences]:
        cached = self.cached_store()
        if cached is not None:
            return cached.splits()
        sequences = self.sequences()
        names = np.array([assign_split(i, self.valid_frac, self.test_frac, self.split_seed) for i in sequences.ids])
        splits = {split: sequences.subset(np.flatnonzero(names == split)) for split in SPLITS}
        if len(splits["train"]) == 0 or len(splits["valid"]) == 0:
            raise ValueError(
                f"{self.path}: split gave {len(splits['train'])} train and {len(splits['valid'])} valid sequences; "
                "both must be non-empty (use more sequences or larger valid_frac)"
            )
        return splits
