"""Reading a token store written by ``pp-preprocess`` (:mod:`.preprocess`), memory-mapped, TrEMBL-sized.

Layout of a store directory::

    manifest.json                 written last by preprocess; a store without it is refused
    shards/FFFF-CCCCCC/tokens.npy uint8 residue ids of the shard's sequences, back to back
    shards/FFFF-CCCCCC/offsets.npy int64 [n + 1]: sequence j is tokens[offsets[j]:offsets[j + 1]]
    shards/FFFF-CCCCCC/meta.parquet accession, header fields, length, file, line (from parsing)
    shards/FFFF-CCCCCC/acc_hash.npy uint64 accession hashes (duplicate-id detection)
    metadata/FFFF-CCCCCC.parquet  split, status of the same rows (from finalize; TokenStore.metadata joins them)
    index/{split}.rows.npy        int64 global row ids (shard order, then position) of each split
    index/{split}.lengths.npy     int64 residue counts of those rows

``open_store(path, "train")`` returns a :class:`StoreSequences`, which has the interface of
``TokenizedSequences`` (``len``, ``[i]`` -> uint8 array, ``lengths``, ``ids``, ``subset``), so
``SingleSequenceDataset`` and ``ConcatChunkDataset`` work on it unchanged. Token files are memory-mapped
lazily (one open file per touched shard) and dropped on pickling, so DataLoader workers re-open them.
"""

from __future__ import annotations

import json
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

STORE_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test", "ood")


class StoreError(RuntimeError):
    """A token store is missing, incomplete, inconsistent or was started with other arguments."""


class ShardReader:
    """Sequences of a list of shards addressed by global row id (shard order, then position in shard)."""

    def __init__(self, root: str | Path, names: Sequence[str], starts: Sequence[int]) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.starts = [int(s) for s in starts]  # len(names) + 1 cumulative row counts
        self._tokens: dict[int, np.ndarray] = {}
        self._offsets: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in self._tokens:
            folder = self.root / "shards" / self.names[s]
            self._offsets[s] = np.load(folder / "offsets.npy")
            # a plain ndarray view of the memmap: slicing it is cheaper than slicing np.memmap
            self._tokens[s] = np.load(folder / "tokens.npy", mmap_mode="r").view(np.ndarray)
        return self._tokens[s], self._offsets[s]

    def row(self, r: int) -> np.ndarray:
        """Residue ids (uint8, read-only view) of global row ``r``."""
        s = bisect_right(self.starts, r) - 1
        if not 0 <= s < len(self.names):
            raise IndexError(f"row {r} out of range ({len(self)} rows)")
        tokens, offsets = self._shard(s)
        j = r - self.starts[s]
        return tokens[offsets[j] : offsets[j + 1]]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": {}, "_offsets": {}}


class TokenStore:
    """A finished token store: its manifest, shards and per-split indices (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: no such token store directory (create one with pp-preprocess)")
        if not manifest_path.exists():
            raise StoreError(
                f"{self.path}: no manifest.json, so the store is incomplete (preprocessing was interrupted, failed "
                "or is still running); rerun pp-preprocess with the same arguments to finish it"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != STORE_VERSION:
            raise StoreError(f"{self.path}: store version {self.manifest.get('version')}, expected {STORE_VERSION}")
        from proteinperformer.tokenizer import Alphabet

        if self.manifest["alphabet"] != Alphabet().all_toks:
            raise StoreError(f"{self.path}: written with another alphabet; re-run pp-preprocess")
        shards = self.manifest["shards"]
        starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s["sequences"] for s in shards], out=starts[1:])
        self.shards = ShardReader(self.path, [s["name"] for s in shards], starts.tolist())
        self._accessions: np.ndarray | None = None

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["counts"]["splits"])

    def split(self, name: str = "train") -> StoreSequences:
        """The sequences of split ``name`` ("train", "valid", "test" or "ood")."""
        if name not in self.manifest["counts"]["splits"]:
            raise StoreError(f"{self.path}: no split {name!r}; the store has {self.split_names}")
        rows = np.load(self.path / "index" / f"{name}.rows.npy", mmap_mode="r")
        lengths = np.load(self.path / "index" / f"{name}.lengths.npy", mmap_mode="r")
        return StoreSequences(self, np.asarray(rows), np.asarray(lengths))

    def accessions(self, rows: np.ndarray) -> list[str]:
        """Accessions of global ``rows`` (loads the accession column of all shards once)."""
        if self._accessions is None:
            files = [self.path / "shards" / n / "meta.parquet" for n in self.shards.names]
            columns = [pd.read_parquet(f, columns=["accession"])["accession"].to_numpy(object) for f in files]
            self._accessions = np.concatenate(columns) if columns else np.empty(0, dtype=object)
        return self._accessions[np.asarray(rows, dtype=np.int64)].tolist()

    def metadata(self, shard: str | None = None) -> pd.DataFrame:
        """Metadata table, one row per sequence in the shards (kept or not), in global row order.

        Columns: accession, db, entry_name, description, OS, OX, GN, PE, SV (None where the header has no such
        field), length, file, line, split (None unless kept), status, shard. ``shard``: one shard only.
        """
        parts = []
        for name in [shard] if shard else self.shards.names:
            meta = pd.read_parquet(self.path / "shards" / name / "meta.parquet")
            extra = pd.read_parquet(self.path / "metadata" / f"{name}.parquet")
            parts.append(pd.concat([meta, extra], axis=1).assign(shard=name))
        return pd.concat(parts, ignore_index=True)

    def verify(self) -> None:
        """Recompute the CRC-32 of every shard and index file and compare with the manifest."""
        for shard in self.manifest["shards"]:
            for fname, expected in shard["checksums"].items():
                got = _file_crc(self.path / "shards" / shard["name"] / fname)
                if got != expected:
                    raise StoreError(f"{self.path}/shards/{shard['name']}/{fname}: checksum {got} != {expected}")
        for fname, expected in self.manifest["index_checksums"].items():
            got = _file_crc(self.path / "index" / fname)
            if got != expected:
                raise StoreError(f"{self.path}/index/{fname}: checksum {got} != {expected}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_accessions": None}


def _file_crc(path: Path) -> str:
    array = np.load(path, mmap_mode="r")
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B')):08x}"


class StoreSequences:
    """One split of a :class:`TokenStore`, with the interface of ``TokenizedSequences``.

    ``len()``; ``[i]`` -> uint8 array [length_i] (read-only memmap view); ``lengths`` int64 [n]; ``ids``
    (accessions, loaded on first use); ``subset(indices)`` -> another view (no copy).
    """

    def __init__(self, store: TokenStore, rows: np.ndarray, lengths: np.ndarray) -> None:
        if len(rows) != len(lengths):
            raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
        self.store = store
        self.rows = rows
        self.lengths = lengths
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store.shards.row(int(self.rows[i]))

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self.store.accessions(self.rows)
        return self._ids

    @property
    def tokens(self) -> np.ndarray:
        """All residues of the split in one array (materialised: for small stores and statistics only)."""
        parts = [self[i] for i in range(len(self))]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)

    def subset(self, indices: Sequence[int] | np.ndarray) -> StoreSequences:
        """A view holding only ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        return StoreSequences(self.store, self.rows[indices], self.lengths[indices])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ids": None}


def open_store(path: str | Path, split: str = "train") -> StoreSequences:
    """Open split ``split`` of the token store at ``path`` (raises StoreError if it is incomplete)."""
    return TokenStore(path).split(split)
