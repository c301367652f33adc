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
    index/offsets.npy             int64 [rows + 1]: token positions of every shard row, store-wide (one index)
    index/{split}.clusters.npy    with --clusters: int64 [C + 1] start of each cluster in {split}.rows.npy

``open_store(path, "train")`` returns a :class:`StoreSequences`, which has the interface of
``TokenizedSequences`` (``len``, ``[i]`` -> uint8 array, ``lengths``, ``ids``, ``subset``), so
``SingleSequenceDataset`` and ``ConcatChunkDataset`` work on it unchanged. Token files are memory-mapped
lazily (at most ``ShardReader.max_open`` at a time) and dropped on pickling, so DataLoader workers re-open
them. Memory per process: nothing per sequence beyond the memory-mapped index pages it touches.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

STORE_VERSION = 2  # 2: index/offsets.npy and per-split residue counts in the manifest
SPLIT_NAMES = ("train", "valid", "test", "ood")


class StoreError(RuntimeError):
    """A token store is missing, incomplete, inconsistent or was started with other arguments."""


DAMAGED_ADVICE = ("check the store with pp-preprocess --verify STORE; copy it again or rerun pp-preprocess with the "
                  "same arguments (it rebuilds what is missing)")


def npy_nbytes(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, expected file size) of a ``.npy`` file from its header alone (one small read)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def check_shard_sizes(root: Path, shards: Sequence[dict]) -> None:
    """Raise :class:`StoreError` naming the first shard file whose size or shape does not match the manifest
    (truncated or half-copied): two header reads per shard, no data read."""
    for shard in shards:
        folder = root / "shards" / shard["name"]
        for fname, want in (("tokens.npy", (shard["residues"],)), ("offsets.npy", (shard["sequences"] + 1,))):
            path = folder / fname
            try:
                shape, size = npy_nbytes(path)
                actual = path.stat().st_size
            except (OSError, ValueError) as err:
                raise StoreError(f"{path}: missing or unreadable ({err}); {DAMAGED_ADVICE}") from err
            if tuple(shape) != want or actual != size:
                raise StoreError(f"{path}: {actual:,} bytes, the manifest needs {size:,} (shape {want}): the file is "
                                 f"truncated or damaged; {DAMAGED_ADVICE}")


class ShardReader:
    """Sequences of a list of shards addressed by global row id (shard order, then position in shard).

    Where a row's tokens lie comes from one store-wide index, ``index/offsets.npy`` (int64 [rows + 1],
    token positions as if all shards were one array), memory-mapped: its pages are shared by every process
    and rank reading the store. Token files are memory-mapped on demand and at most ``max_open`` stay open
    (least recently used closed first), so a DataLoader worker holds a bounded number of files whatever the
    number of shards. ``offsets_path=None`` (finalize, before the index exists) reads each shard's own
    ``offsets.npy`` instead.
    """

    def __init__(
        self,
        root: str | Path,
        names: Sequence[str],
        starts: Sequence[int],
        offsets_path: str | Path | None = None,
        max_open: int = 32,
    ) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.starts = np.asarray(starts, dtype=np.int64)  # len(names) + 1 cumulative row counts
        self.offsets_path = None if offsets_path is None else Path(offsets_path)
        self.max_open = max_open
        from proteinperformer.tokenizer import Alphabet

        self.n_tokens = len(Alphabet().all_toks)
        self._offsets: np.ndarray | None = None
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def offsets(self) -> np.ndarray:
        """Store-wide token offsets (memory map), int64 [rows + 1]."""
        if self._offsets is None:
            self._offsets = np.load(self.offsets_path, mmap_mode="r")
        return self._offsets

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray | None]:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        folder = self.root / "shards" / self.names[s]
        try:  # a plain ndarray view of the memmap: slicing it is cheaper than slicing np.memmap
            tokens = np.load(folder / "tokens.npy", mmap_mode="r").view(np.ndarray)
            local = np.load(folder / "offsets.npy", mmap_mode="r") if self.offsets_path is None else None
        except (OSError, ValueError) as err:
            raise StoreError(f"{folder}: shard unreadable ({err}); {DAMAGED_ADVICE}") from err
        self._open[s] = (tokens, local)
        while len(self._open) > self.max_open:  # dropping the last reference unmaps and closes the file
            self._open.popitem(last=False)
        return tokens, local

    def row(self, r: int) -> np.ndarray:
        """Residue ids (uint8, read-only view) of global row ``r``."""
        s = int(np.searchsorted(self.starts, r, side="right")) - 1
        if not 0 <= s < len(self.names) or r < 0:
            raise IndexError(f"row {r} out of range ({len(self)} rows)")
        tokens, local = self._shard(s)
        if local is not None:
            j = r - int(self.starts[s])
            return tokens[int(local[j]) : int(local[j + 1])]
        base = int(self.offsets[self.starts[s]])
        lo, hi = int(self.offsets[r]) - base, int(self.offsets[r + 1]) - base
        seq = tokens[lo:hi]
        # a damaged shard is an error naming it, never a silent garbage batch: the row must lie inside the file
        # and hold token ids of the alphabet (one pass over a few hundred bytes)
        if len(seq) != hi - lo or hi < lo or (len(seq) and int(seq.max()) >= self.n_tokens):
            raise StoreError(f"{self.root / 'shards' / self.names[s] / 'tokens.npy'}: row {r} is damaged (out of "
                             f"the file or not token ids); {DAMAGED_ADVICE}")
        return seq

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_offsets": None, "_open": OrderedDict()}


class TokenStore:
    """A finished token store: its manifest, shards and per-split indices (see the module docstring)."""

    def __init__(self, path: str | Path, check_sizes: bool = True) -> None:
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
            raise StoreError(
                f"{self.path}: store version {self.manifest.get('version')}, this proteinperformer reads version "
                f"{STORE_VERSION}; rerun pp-preprocess with the same arguments (it keeps the shards and redoes only "
                "the indexes)"
            )
        from proteinperformer.tokenizer import Alphabet

        if self.manifest["alphabet"] != Alphabet().all_toks:
            raise StoreError(f"{self.path}: written with another alphabet; re-run pp-preprocess")
        shards = self.manifest["shards"]
        if check_sizes:  # a truncated or half-copied shard is refused at once, by name (no data read)
            check_shard_sizes(self.path, shards)
        starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s["sequences"] for s in shards], out=starts[1:])
        self.shards = ShardReader(self.path, [s["name"] for s in shards], starts, self.path / "index" / "offsets.npy")
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
        return StoreSequences(self, rows, lengths, split=name)

    def cluster_starts(self, name: str) -> np.ndarray | None:
        """int64 [C + 1] (memory map): where each cluster of split ``name`` starts among its rows, or None for a
        store made without ``--clusters``."""
        path = self.path / "index" / f"{name}.clusters.npy"
        return np.load(path, mmap_mode="r") if path.exists() else None

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

    def checksummed_files(self) -> list[tuple[Path, str]]:
        """(path, CRC-32 hex the manifest records) of every shard and index file."""
        files = [(self.path / "shards" / shard["name"] / fname, expected)
                 for shard in self.manifest["shards"] for fname, expected in shard["checksums"].items()]
        return files + [(self.path / "index" / fname, expected)
                        for fname, expected in self.manifest["index_checksums"].items()]

    def verify(self) -> None:
        """Raise :class:`StoreError` naming every damaged or missing file (:meth:`damaged_files`)."""
        problems = self.damaged_files()
        if problems:
            raise StoreError(f"{len(problems)} damaged file(s): " + "; ".join(problems))

    def damaged_files(self, progress: bool = False) -> list[str]:
        """Recompute the CRC-32 of every shard and index file; returns one line per damaged or missing file
        (empty: the store is intact). ``progress``: a bar in bytes."""
        from proteinperformer.progress import track

        files = self.checksummed_files()
        sizes = [p.stat().st_size if p.exists() else 0 for p, _ in files]
        problems = []
        with track(total=sum(sizes), unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
            for (path, expected), size in zip(files, sizes, strict=True):
                try:
                    got = _file_crc(path)
                except (OSError, ValueError) as err:
                    problems.append(f"{path}: missing or unreadable ({' '.join(str(err).split())})")
                else:
                    if got != expected:
                        problems.append(f"{path}: checksum {got}, the manifest says {expected} (damaged)")
                bar.update(size)
        return problems

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_accessions": None}


def _file_crc(path: Path, block: int = 1 << 24) -> str:
    """CRC-32 of a ``.npy`` file's array bytes (as finalize records it), read in 16 MiB blocks."""
    flat = np.load(path, mmap_mode="r").reshape(-1).view(np.uint8)
    crc = 0
    for lo in range(0, len(flat), block):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[lo : lo + block])), crc)
    return f"{crc:08x}"


class StoreSequences:
    """One split of a :class:`TokenStore`, with the interface of ``TokenizedSequences``.

    ``len()``; ``[i]`` -> uint8 array [length_i] (read-only memmap view); ``lengths`` int64 [n] and the row
    index (memory maps of the split's index files, re-opened, not copied, when pickled); ``ids`` (accessions,
    loaded on first use: ~70 bytes per sequence, for small stores and tests); ``subset(indices)`` -> another
    view (its row index in memory); ``residue_counts()`` from the manifest; ``cluster_starts()``.
    """

    def __init__(self, store: TokenStore, rows: np.ndarray, lengths: np.ndarray, split: str | None = None) -> None:
        if len(rows) != len(lengths):
            raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
        self.store = store
        self.rows = rows
        self.lengths = lengths
        self.split = split  # the whole split (index files memory-mapped), or None for a subset
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

    def cluster_starts(self) -> np.ndarray | None:
        """int64 [C + 1]: where each cluster starts among the split's rows (``TokenStore.cluster_starts``); None for
        a subset or a store made without ``--clusters``."""
        return None if self.split is None else self.store.cluster_starts(self.split)

    def residue_counts(self, vocab_size: int) -> np.ndarray:
        """Occurrences of each token id in the split's residues, int64 [vocab_size].

        A whole split reads them from the manifest (pp-preprocess counts them); a subset streams its rows.
        """
        if self.split is not None:
            counts = np.asarray(self.store.manifest["counts"]["splits"][self.split]["residue_counts"], np.int64)
            return np.pad(counts, (0, max(0, vocab_size - len(counts))))[:vocab_size]
        return streamed_residue_counts(self, vocab_size)

    def subset(self, indices: Sequence[int] | np.ndarray) -> StoreSequences:
        """A view holding only ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        return StoreSequences(self.store, np.asarray(self.rows[indices]), np.asarray(self.lengths[indices]))

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_ids": None}
        if self.split is not None:  # re-open the index files where unpickled instead of copying them
            state["rows"] = state["lengths"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.split is not None:
            index = self.store.path / "index"
            self.rows = np.load(index / f"{self.split}.rows.npy", mmap_mode="r")
            self.lengths = np.load(index / f"{self.split}.lengths.npy", mmap_mode="r")


def streamed_residue_counts(sequences, vocab_size: int, chunk: int = 4096) -> np.ndarray:
    """Token-id counts over all sequences of ``sequences`` (``len``, ``[i]``), a few sequences at a time."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo in range(0, len(sequences), chunk):
        part = [sequences[i] for i in range(lo, min(len(sequences), lo + chunk))]
        if part:
            counts += np.bincount(np.concatenate(part), minlength=vocab_size)[:vocab_size]
    return counts


def open_store(path: str | Path, split: str = "train") -> StoreSequences:
    """Open split ``split`` of the token store at ``path`` (raises StoreError if it is incomplete)."""
    return TokenStore(path).split(split)
