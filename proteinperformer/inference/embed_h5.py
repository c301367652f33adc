"""``pp-embed --format h5``: embeddings streamed to one HDF5 shard per rank, linked into ``embeddings.h5`` at the end.

Nothing holds the collection in memory: each rank appends every finished batch to its own shard
``OUTDIR/shards/rank<R>-<run id>.h5`` and flushes it, and the final step writes ``OUTDIR/embeddings.h5``, whose
arrays are HDF5 virtual datasets over the shards (only the label index is copied, in blocks), so linking costs
O(number of proteins) small writes and no array data. Keep ``shards/`` beside ``embeddings.h5``: the arrays live
there (h5py / HDF5 ≥ 1.10 follow the links transparently; ``h5repack`` makes a self-contained copy).

Layout of a shard and of ``embeddings.h5`` (N proteins, L_i residues each, D features)::

    labels            [N]        str, the index: row i of every per-protein array belongs to labels[i]
    lengths           [N]        int64, residues stored per protein (L_i)
    mean/<layer>      [N, D]     mean_representations (layer as esm-extract writes it: -1 -> depth)
    bos/<layer>       [N, D]     bos_representations
    per_tok/<layer>   [ΣL_i, D]  representations, protein i in rows offsets[i]:offsets[i + 1]
    contacts          [ΣL_i²]    each protein's [L_i, L_i] map, flattened, from contact_offsets[i]
    offsets, contact_offsets [N + 1] int64 (embeddings.h5 only; a shard's follow from lengths)

A batch is written arrays first, then ``lengths``, then ``labels``, then flushed: the label index is the commit
point. A killed run leaves each shard valid up to its last indexed label (rows written past it are ignored), and
resuming reads only ``labels`` of every shard (:func:`shard_labels`), never an array; a shard too damaged to open
is set aside as ``*.h5.broken`` and its proteins are embedded again.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from proteinperformer.files import require_free_space, write_atomic

SHARD_DIR = "shards"
KINDS = {"mean_representations": "mean", "bos_representations": "bos", "representations": "per_tok"}
_BLOCK = 1 << 20  # labels copied per step when linking


def _h5py():
    import h5py

    return h5py


def shard_paths(outdir: Path) -> list[Path]:
    """The shards of ``outdir``, in name order."""
    return sorted((Path(outdir) / SHARD_DIR).glob("*.h5"))


def _open_shard(path: Path):
    """A shard opened for reading, or None (and the file renamed ``*.broken``) when HDF5 cannot read it."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
        if "labels" not in f:  # killed before its first batch was indexed
            f.close()
            return None
        return f
    except BlockingIOError:  # HDF5's file lock: a writer has it open
        raise ValueError(f"{path}: in use by another process (a pp-embed still writing to this OUTDIR?); wait for it "
                         "to finish or embed into another OUTDIR") from None
    except OSError as err:
        warnings.warn(f"{path}: unreadable shard ({err}); set aside as {path.name}.broken, its proteins are embedded "
                      "again", stacklevel=2)
        path.rename(path.with_name(path.name + ".broken"))
        return None


def shard_labels(outdir: Path) -> set[str]:
    """Labels already embedded in ``outdir``'s shards (reads only each shard's label index)."""
    done: set[str] = set()
    for path in shard_paths(outdir):
        f = _open_shard(path)
        if f is None:
            continue
        with f:
            labels = f["labels"]
            for start in range(0, labels.shape[0], _BLOCK):
                done.update(s.decode() for s in labels[start : start + _BLOCK])
    return done


class ShardWriter:
    """One rank's shard, appended per batch (see the module docstring for the layout and the commit order)."""

    def __init__(self, outdir: Path, rank: int, dtype: str = "float32") -> None:
        self.path = Path(outdir) / SHARD_DIR / f"rank{rank}-{uuid.uuid4().hex[:12]}.h5"
        self.dtype = np.dtype(dtype)
        self.file = None

    def _append(self, name: str, rows: np.ndarray) -> None:
        h5py = _h5py()
        if name not in self.file:
            row_bytes = rows[0].nbytes if rows.ndim > 1 else 8
            chunk = (max(1, min(1 << 16, (1 << 20) // row_bytes)), *rows.shape[1:])  # ~1 MiB chunks
            dtype = h5py.string_dtype() if rows.dtype == object else rows.dtype
            self.file.create_dataset(name, shape=(0, *rows.shape[1:]), maxshape=(None, *rows.shape[1:]),
                                     chunks=chunk, dtype=dtype)
        ds = self.file[name]
        n = ds.shape[0]
        ds.resize(n + len(rows), axis=0)
        ds[n:] = rows

    def write(self, records: Sequence[dict], lengths: Sequence[int]) -> None:
        """Append esm-extract style records (``label``, ``*_representations`` {layer: tensor}, ``contacts``) of
        proteins with ``lengths`` residues (the stored per-residue rows when there are any)."""
        if not records:
            return
        # HDF5 cannot survive a write onto a full disk (the process segfaults at exit): check first, with room for
        # one new ~1 MiB chunk per dataset and the file's metadata
        arrays = sum(t.numel() * self.dtype.itemsize for r in records for k in KINDS for t in r.get(k, {}).values())
        require_free_space(self.path, arrays + (2 + sum(len(records[0].get(k, {})) for k in KINDS)) * 2**20)
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = _h5py().File(self.path, "w")
        first = records[0]
        for key, kind in KINDS.items():
            for layer in first.get(key, {}):
                rows = [r[key][layer].numpy().astype(self.dtype, copy=False) for r in records]
                self._append(f"{kind}/{layer}", np.concatenate(rows) if kind == "per_tok" else np.stack(rows))
        if "contacts" in first:
            self._append("contacts", np.concatenate([r["contacts"].numpy().astype(self.dtype).ravel()
                                                     for r in records]))
        self._append("lengths", np.array([_length(r, n) for r, n in zip(records, lengths, strict=True)],
                                         dtype=np.int64))
        self._append("labels", np.array([r["label"] for r in records], dtype=object))  # the commit point
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _length(record: dict, n_residues: int) -> int:
    """Per-residue rows stored for a record (fewer than ``n_residues`` with --truncate), else ``n_residues``."""
    if record.get("representations"):
        return int(next(iter(record["representations"].values())).shape[0])
    if "contacts" in record:
        return int(record["contacts"].shape[0])
    return n_residues


def link_shards(outdir: Path) -> int:
    """Write ``outdir/embeddings.h5`` (temp + rename): the label index of every shard and virtual datasets over
    their arrays; returns the number of proteins. Costs O(proteins) in index copies, nothing per array row."""
    h5py = _h5py()
    outdir = Path(outdir)
    shards = []  # (relative path, n, residues, contact cells, {dataset: (shape, dtype)})
    for path in shard_paths(outdir):
        f = _open_shard(path)
        if f is None:
            continue
        with f:
            n = f["labels"].shape[0]
            lengths = f["lengths"][:n]
            datasets = {}
            f.visititems(lambda name, obj, d=datasets: d.__setitem__(name, (obj.shape, obj.dtype))
                         if isinstance(obj, h5py.Dataset) and name not in ("labels", "lengths") else None)
            shards.append((f"{SHARD_DIR}/{path.name}", n, lengths, datasets))
    names = sorted({name for *_, d in shards for name in d})
    for rel, *_, d in shards:
        if sorted(d) != names:
            raise ValueError(f"{outdir / rel}: holds {sorted(d)} but other shards hold {names}; embed into a new "
                             "OUTDIR when changing --include / --repr-layers")
    total = sum(n for _, n, _, _ in shards)
    lengths = np.concatenate([ln for _, _, ln, _ in shards]) if shards else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    contact_offsets = np.concatenate([[0], np.cumsum(lengths**2)]).astype(np.int64)
    # labels, offsets and the virtual datasets' mappings (HDF5 must not meet a full disk: see ShardWriter.write)
    require_free_space(outdir / "embeddings.h5", 2**20 + total * (64 + 16 * (len(names) + 2)))

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as out:
            labels = out.create_dataset("labels", shape=(total,), dtype=h5py.string_dtype())
            start = 0
            for rel, n, _, _ in shards:
                with h5py.File(outdir / rel, "r") as f:
                    for s in range(0, n, _BLOCK):
                        block = f["labels"][s : min(n, s + _BLOCK)]
                        labels[start + s : start + s + len(block)] = block
                start += n
            out["lengths"], out["offsets"], out["contact_offsets"] = lengths, offsets, contact_offsets
            for name in names:
                shape, dtype = shards[0][3][name]

                def rows(n: int, ln: np.ndarray, name: str = name) -> int:  # rows of one shard that are indexed
                    return int(ln.sum()) if name.startswith("per_tok/") else int((ln**2).sum()) if name == \
                        "contacts" else n

                layout = h5py.VirtualLayout(shape=(sum(rows(n, ln) for _, n, ln, _ in shards), *shape[1:]),
                                            dtype=dtype)
                at = 0
                for rel, n, ln, d in shards:
                    if used := rows(n, ln):
                        layout[at : at + used] = h5py.VirtualSource(rel, name, shape=d[name][0])[0:used]
                    at += used
                out.create_virtual_dataset(name, layout)
            out.attrs["shards"] = [rel for rel, *_ in shards]

    write_atomic(outdir / "embeddings.h5", write)
    return total


def iter_h5(path: Path) -> Iterator[dict]:
    """Stream the esm-extract style records of an ``embeddings.h5`` (one protein at a time)."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        kinds = {key: [int(layer) for layer in f[kind]] for key, kind in KINDS.items() if kind in f}
        offsets, coffsets = f["offsets"][()], f["contact_offsets"][()]
        for i, label in enumerate(f["labels"]):
            record: dict = {"label": label.decode()}
            for key, layers in kinds.items():
                kind = KINDS[key]
                rows = slice(offsets[i], offsets[i + 1]) if kind == "per_tok" else i
                record[key] = {layer: torch.from_numpy(np.asarray(f[f"{kind}/{layer}"][rows])) for layer in layers}
            if "contacts" in f:
                n = int(f["lengths"][i])
                record["contacts"] = torch.from_numpy(f["contacts"][coffsets[i] : coffsets[i + 1]].reshape(n, n))
            yield record
