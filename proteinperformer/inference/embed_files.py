"""The files ``pp-embed`` writes, and the Lightning predict loop that writes them as batches finish.

The CLI (``pp-embed CHECKPOINT FASTA OUTDIR``) runs through Lightning ``Trainer.predict`` so ``--devices
N`` shards batches over N processes (DDP); an :class:`EmbeddingWriter` writes as batches finish, so a
killed run resumes where it stopped. Output formats:

- ``pt`` (default): one ``OUTDIR/<label>.pt`` per sequence as esm-extract writes it: ``{"label",
  "representations": {layer: [L, D]}, "mean_representations": {layer: [D]}, "bos_representations":
  {layer: [D]}, "contacts": [L, L]}`` with non-negative layer numbers (-1 is written as ``depth``, as
  esm-extract does; :func:`read_embeddings` also takes ``[-1]`` when the folder records the depth).
- ``h5`` (any size): streamed, one HDF5 shard per rank appended per batch under ``OUTDIR/shards/``, linked into
  ``OUTDIR/embeddings.h5`` (virtual datasets + a label index) at the end; memory stays flat in the number of
  proteins. Layout, commit order and resume: :mod:`proteinperformer.inference.embed_h5`.
- ``npz`` (small jobs only): one ``OUTDIR/embeddings.npz`` with arrays ``<label>/<kind>/<layer>`` (kind as in
  ``pt``). Ranks write part files under ``OUTDIR/.parts/`` which rank 0 merges at the end; the merge holds the
  whole collection in memory (about the size of the file), so use ``h5`` or ``pt`` beyond a few GB.

Input is streamed: :func:`scan_fasta` reads the FASTA once up front (letters, duplicate labels, lengths against
the model's limit: a too-long sequence stops the run before any embedding, with the ids listed), then each rank
streams it in blocks of ``block`` records, sorts each block by length into token-budget batches and embeds only
its share (every world_size-th batch of the block), so a rank holds one block of sequences, never the file.
Resuming skips the labels already written (``pt``: file names; ``h5``: the shards' label indexes; ``npz``: the
bundle and parts), a set of labels (~100 bytes per label) held while the run lasts. ``OUTDIR/pp_embed.json``
records what the folder holds (format, kinds, absolute layers, depth, dtype): a run that asks for something else
stops in one line (``--overwrite`` starts the folder again) instead of skipping proteins that lack it.

File names and keys escape a label with URL percent-encoding (:func:`safe_name`): letters, digits and
``_.-~`` stay, anything else (``/``, ``|``, spaces, ...) becomes ``%XX``, and a leading ``.`` is escaped
so no label makes a hidden file or ``..``. Decode with ``urllib.parse.unquote``.
"""

from __future__ import annotations

import array
import json
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from proteinperformer.checkpoints import save_atomic
from proteinperformer.data.fasta import FastaFormatError, read_fasta
from proteinperformer.files import write_atomic, write_json_atomic
from proteinperformer.inference.embed import Layers, SequenceTooLongError, batch_indices, embed_batch
from proteinperformer.inference.embed_h5 import SHARD_DIR, ShardWriter, iter_h5, link_shards, shard_labels
from proteinperformer.model import PerformerLM
from proteinperformer.options import LABELS
from proteinperformer.progress.lightning import ItemProgressBar, lightning_notices_silenced

# esm-extract's key names, used in every output file.
FILE_KEYS = {"mean": "mean_representations", "per_tok": "representations", "bos": "bos_representations",
             "contacts": "contacts"}
SETTINGS = "pp_embed.json"  # what a folder holds: format, include, layers (absolute), depth, dtype


def safe_name(label: str) -> str:
    """Percent-encode a label for use as a file name or HDF5/npz key (reversible with ``unquote``)."""
    name = quote(label, safe="")
    return "%2E" + name[1:] if name.startswith(".") else name


def to_file_record(label: str, reps: dict[str, dict[int, torch.Tensor]], depth: int) -> dict:
    """esm-extract's per-sequence dict: label + ``*_representations`` keyed by non-negative layer."""
    record: dict = {"label": label}
    for kind, by_layer in reps.items():
        if kind == "contacts":  # one [L, L] map, not per layer
            record["contacts"] = by_layer
            continue
        record[FILE_KEYS[kind]] = {layer % (depth + 1): t for layer, t in by_layer.items()}
    return record


def bundle_path(outdir: Path, fmt: str) -> Path:
    """The single output file of the ``h5`` / ``npz`` formats."""
    return outdir / f"embeddings.{fmt}"


def _read_bundle(path: Path) -> dict[str, dict]:
    """Read an embeddings.h5/.npz back into {label: file record}."""
    flat: dict[str, np.ndarray] = {}
    if path.suffix == ".npz":
        with np.load(path) as data:
            flat = {k: data[k] for k in data.files}
    else:
        import h5py

        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: flat.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    records: dict[str, dict] = {}
    for key, value in flat.items():
        name, kind, *layer = key.split("/")  # contacts: "<label>/contacts"
        label = unquote(name)
        if not layer:
            records.setdefault(label, {"label": label})[kind] = torch.from_numpy(value)
            continue
        layer = layer[0]
        records.setdefault(label, {"label": label}).setdefault(kind, {})[int(layer)] = torch.from_numpy(value)
    return records


def folder_formats(outdir: Path) -> list[str]:
    """The formats whose output ``outdir`` holds (finished or, for h5/npz, in progress)."""
    found = []
    if any(outdir.glob("*.pt")):
        found.append("pt")
    if bundle_path(outdir, "h5").exists() or (outdir / SHARD_DIR).is_dir():
        found.append("h5")
    if bundle_path(outdir, "npz").exists() or (outdir / ".parts").is_dir():
        found.append("npz")
    return found


def read_settings(outdir: Path) -> dict | None:
    """``OUTDIR/pp_embed.json`` (what the folder holds), or None for a folder an earlier release wrote."""
    path = outdir / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None


def read_embeddings(outdir: str | Path, fmt: str | None = None) -> dict[str, dict]:
    """Load what ``pp-embed`` wrote to ``outdir`` as {label: esm-extract style record}; ``fmt`` None finds the
    format in the folder. Layer dicts are :class:`~proteinperformer.inference.embed.Layers`: keyed 0..depth as
    written, and ``[-1]`` works when the folder records the depth (``pp_embed.json``). A missing folder, one with
    no embeddings, or one without ``fmt``'s files raises ValueError naming the folder."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise ValueError(f"{outdir}: no such folder; give the --out folder pp-embed wrote")
    found = folder_formats(outdir)
    if not found:
        raise ValueError(f"{outdir}: holds no pp-embed output (no *.pt, embeddings.h5 or embeddings.npz)")
    if fmt is None:
        if len(found) > 1:
            raise ValueError(f"{outdir}: holds {' and '.join(found)} embeddings; pass fmt= one of them")
        fmt = found[0]
    elif fmt not in found:
        raise ValueError(f"{outdir}: holds {' and '.join(found)} embeddings, not {fmt}; pass fmt={found[0]!r}")
    if fmt != "pt" and not bundle_path(outdir, fmt).exists():
        raise ValueError(f"{outdir}: the {fmt} run did not finish ({bundle_path(outdir, fmt).name} is missing); "
                         "run the same pp-embed command again to finish it")
    if fmt == "pt":
        records = {r["label"]: r for r in (torch.load(p, weights_only=True) for p in sorted(outdir.glob("*.pt")))}
    elif fmt == "h5":
        records = {r["label"]: r for r in iter_h5(bundle_path(outdir, fmt))}
    else:
        records = _read_bundle(bundle_path(outdir, fmt))
    depth = (read_settings(outdir) or {}).get("depth")
    for record in records.values():
        for key, value in record.items():
            if key.endswith("representations"):
                record[key] = Layers(value, depth)
    return records


def settings_of(fmt: str, include: Sequence[str], layers: Iterable[int], depth: int, dtype: str) -> dict:
    """What a run writes to a folder, as ``pp_embed.json`` records it (layers absolute, sorted)."""
    return {"format": fmt, "include": sorted(include), "repr_layers": sorted({int(x) % (depth + 1) for x in layers}),
            "depth": depth, "dtype": dtype}


def _peek_settings(outdir: Path, fmt: str) -> dict | None:
    """What an earlier release's pt folder holds (one file's kinds and layers); None when it cannot tell."""
    first = next(iter(sorted(outdir.glob("*.pt"))), None) if fmt == "pt" else None
    if first is None:
        return None
    record = torch.load(first, weights_only=True)
    kinds = {v: k for k, v in FILE_KEYS.items()}
    include = sorted(kinds[k] for k in record if k in kinds)
    layers = sorted({int(x) for k, v in record.items() if k.endswith("representations") for x in v})
    return {"format": fmt, "include": include, "repr_layers": layers}


def _describe(s: dict) -> str:
    return (f"--include {' '.join(s['include'])} --repr-layers {' '.join(map(str, s['repr_layers']))} "
            f"--format {s['format']}" + (f" --dtype {s['dtype']}" if s.get("dtype") else ""))


def prepare_folder(outdir: Path, settings: dict, overwrite: bool = False) -> None:
    """Make ``outdir`` ready for a run that writes ``settings`` (:func:`settings_of`): a folder holding other
    kinds, layers, format or dtype raises ValueError in one line (a resumed run would skip proteins that lack
    what was asked), unless ``overwrite``, which removes the embeddings there first. Writes ``pp_embed.json``."""
    outdir.mkdir(parents=True, exist_ok=True)
    found = folder_formats(outdir)
    before = read_settings(outdir) or (_peek_settings(outdir, found[0]) if found else None)
    if found and not overwrite:
        if found != [settings["format"]]:
            raise ValueError(f"{outdir}: holds {' and '.join(found)} embeddings; this run writes "
                             f"{settings['format']}: give another --out, or --overwrite to start the folder again")
        keys = [k for k in ("include", "repr_layers", "dtype") if before and k in before]
        if before is not None and any(before[k] != settings[k] for k in keys):
            raise ValueError(f"{outdir}: holds proteins embedded with {_describe(before)}; this run asks for "
                             f"{_describe(settings)}: give another --out, or --overwrite to embed every protein "
                             "again")
    if found and overwrite:
        for path in outdir.glob("*.pt"):
            path.unlink()
        for fmt in ("h5", "npz"):
            bundle_path(outdir, fmt).unlink(missing_ok=True)
        for folder in (outdir / SHARD_DIR, outdir / ".parts"):
            shutil.rmtree(folder, ignore_errors=True)
    write_json_atomic(outdir / SETTINGS, settings)


def _write_bundle(records: Iterable[dict], path: Path) -> None:
    """Write {label/kind/layer: array} (contacts: {label/contacts: array}) to ``path`` (h5 or npz) via a temp
    file + rename."""
    flat = {
        f"{safe_name(r['label'])}/{kind}/{layer}": t.numpy()
        for r in records
        for kind, by_layer in r.items()
        if kind not in ("label", "contacts")
        for layer, t in by_layer.items()
    }
    flat |= {f"{safe_name(r['label'])}/contacts": r["contacts"].numpy() for r in records if "contacts" in r}

    def write(tmp: Path) -> None:
        if path.suffix == ".npz":
            with open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to a name
                np.savez(handle, **flat)
            return
        import h5py

        with h5py.File(tmp, "w") as f:
            for key, array in flat.items():
                f.create_dataset(key, data=array)

    write_atomic(path, write)


def done_labels(outdir: Path, fmt: str) -> set[str]:
    """Labels already written to ``outdir`` (finished files and part files of an interrupted run)."""
    if fmt == "pt":
        return {unquote(p.stem) for p in outdir.glob("*.pt")}
    if fmt == "h5":
        return shard_labels(outdir)
    done = set(_read_bundle(bundle_path(outdir, fmt))) if bundle_path(outdir, fmt).exists() else set()
    for part in sorted((outdir / ".parts").glob("*.pt")):
        done.update(r["label"] for r in torch.load(part, weights_only=True))
    return done


def merge_parts(outdir: Path, fmt: str) -> int:
    """Fold the part files of all ranks (and any earlier bundle) into ``embeddings.<fmt>``; returns #labels.
    ``h5``: link the shards (:func:`~proteinperformer.inference.embed_h5.link_shards`), no array is read."""
    if fmt == "h5":
        return link_shards(outdir)
    parts = sorted((outdir / ".parts").glob("*.pt"))
    path = bundle_path(outdir, fmt)
    records = _read_bundle(path) if path.exists() else {}
    for part in parts:
        records.update((r["label"], r) for r in torch.load(part, weights_only=True))
    if parts or not path.exists():
        _write_bundle(records.values(), path)
    for part in parts:
        part.unlink()
    if (outdir / ".parts").is_dir() and not any((outdir / ".parts").iterdir()):
        (outdir / ".parts").rmdir()
    return len(records)


# ---- streamed input ----------------------------------------------------------------------------
def fasta_records(fasta: Path, label: str = "accession") -> Iterator[tuple[str, str]]:
    """(label, sequence) of each FASTA record, streamed; ``label`` "accession" (the record id: UniProt accession
    or first word) or "header" (the whole header line, as esm-extract names its files). A terminal ``*`` is dropped."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    for rec in read_fasta(fasta):
        yield (rec.id if label == "accession" else rec.header.strip()), rec.sequence.removesuffix("*")


def scan_fasta(fasta: Path, label: str = "accession", limit: int | None = None, skip: set[str] = frozenset(),
               alphabet=None) -> dict:
    """Read ``fasta`` once before any embedding: letters (with ``alphabet``), duplicate labels, and lengths against
    ``limit`` residues (None = no check). Returns ``{"n": records, "todo": records not in skip, "residues": of
    those}``; raises :class:`SequenceTooLongError` listing every too-long id, or FastaFormatError for a duplicate.

    Memory: 8 bytes per record (a hash of each label, to find duplicates), plus the too-long ids."""
    from proteinperformer.tokenizer import Alphabet

    alphabet = alphabet or Alphabet()
    hashes = array.array("q")
    too_long: list[tuple[str, int]] = []
    n = todo = residues = 0
    for rec in read_fasta(fasta, alphabet):
        name = rec.id if label == "accession" else rec.header.strip()
        length = len(rec.sequence.removesuffix("*"))
        hashes.append(hash(name))
        n += 1
        if name not in skip:
            todo += 1
            residues += length
            if limit is not None and length > limit:
                too_long.append((name, length))
    if too_long:
        shown = ", ".join(f"{name} ({length})" for name, length in too_long[:20])
        raise SequenceTooLongError(
            f"{fasta}: {len(too_long)} sequence(s) longer than the {limit} residues this model takes in one pass: "
            f"{shown}{' ...' if len(too_long) > 20 else ''}; nothing was embedded. Use --truncate (keep the first "
            f"{limit}) or --chunk (overlapping windows), --attention favor (no cap with rotary or sinusoidal "
            "positions), or remove them")
    sorted_hashes = np.sort(np.frombuffer(hashes, dtype=np.int64))
    if len(sorted_hashes) > 1 and (clash := set(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])):
        first: dict[str, int] = {}  # a second pass over the few labels whose hashes collide
        for rec in read_fasta(fasta):
            name = rec.id if label == "accession" else rec.header.strip()
            if hash(name) in clash:
                if name in first:
                    raise FastaFormatError(f"{fasta}:{rec.line}: duplicate label {name!r} (first at line "
                                           f"{first[name]}); labels must be unique"
                                           + (" (try --label header)" if label == "accession" else ""))
                first[name] = rec.line
    return {"n": n, "todo": todo, "residues": residues}


class FastaBatches(IterableDataset):
    """Token-budget batches of (label, sequence) streamed from a FASTA (or a list of records): blocks of ``block``
    records not in ``skip`` are sorted by length and batched (ESM's ``get_batch_indices``); rank ``rank`` of
    ``world`` yields every world-th batch of each block. Holds one block at a time."""

    def __init__(self, source: Path | Sequence[tuple[str, str]], toks_per_batch: int, label: str = "accession",
                 skip: set[str] = frozenset(), block: int = 100_000, rank: int = 0, world: int = 1) -> None:
        self.source, self.toks_per_batch, self.label, self.skip = source, toks_per_batch, label, skip
        self.block, self.rank, self.world = block, rank, world

    def _share(self, records: list[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
        batches = batch_indices([len(s) for _, s in records], self.toks_per_batch)
        for idx in batches[self.rank :: self.world]:
            yield [records[i] for i in idx]

    def __iter__(self) -> Iterator[list[tuple[str, str]]]:
        records = fasta_records(self.source, self.label) if isinstance(self.source, str | Path) else self.source
        block: list[tuple[str, str]] = []
        for label, seq in records:
            if label in self.skip:
                continue
            block.append((label, seq))
            if len(block) == self.block:
                yield from self._share(block)
                block = []
        if block:
            yield from self._share(block)


# ---- Lightning predict (multi-device) -----------------------------------------------------------
class EmbeddingTask(pl.LightningModule):
    """Wraps a PerformerLM for ``Trainer.predict``: each batch is a list of (label, sequence)."""

    def __init__(self, model: PerformerLM, layers: Sequence[int], include: Sequence[str], on_long: str,
                 contact_head=None, precision: str = "32", dtype: str = "float32") -> None:
        super().__init__()
        self.model, self.layers, self.include, self.on_long = model, list(layers), tuple(include), on_long
        self.contact_head, self.precision, self.store_dtype = contact_head, precision, getattr(torch, dtype)

    def predict_step(self, batch: list[tuple[str, str]], batch_idx: int) -> list[dict]:
        reps = embed_batch(self.model, batch, self.layers, self.include, self.on_long, precision=self.precision,
                           contact_head=self.contact_head)
        if self.store_dtype != torch.float32:
            reps = [(label, {k: v.to(self.store_dtype) if k == "contacts" else {layer: t.to(self.store_dtype)
                                                                             for layer, t in v.items()}
                             for k, v in r.items()}) for label, r in reps]
        return [to_file_record(label, r, self.model.config.depth) for label, r in reps]


class EmbeddingData(pl.LightningDataModule):
    """Streams :class:`FastaBatches` of ``source`` for this rank (``trainer.global_rank`` of ``world_size``)."""

    def __init__(self, source: Path | Sequence[tuple[str, str]], toks_per_batch: int, label: str = "accession",
                 skip: set[str] = frozenset(), block: int = 100_000) -> None:
        super().__init__()
        self.source, self.toks_per_batch, self.label, self.skip, self.block = source, toks_per_batch, label, skip, block

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        batches = FastaBatches(self.source, self.toks_per_batch, self.label, self.skip, self.block, rank, world)
        return DataLoader(batches, batch_size=None, collate_fn=_identity)


def _identity(batch):
    return batch


class EmbeddingWriter(BasePredictionWriter):
    """Writes each predicted batch at once: ``pt`` -> one file per label (temp + rename); ``h5`` -> appended to this
    rank's shard (:class:`~proteinperformer.inference.embed_h5.ShardWriter`); ``npz`` -> a per-rank part file under
    ``OUTDIR/.parts/`` (temp + rename, merged by :func:`merge_parts`)."""

    def __init__(self, outdir: Path, fmt: str, dtype: str = "float32") -> None:
        super().__init__(write_interval="batch")
        self.outdir, self.fmt, self.dtype = Path(outdir), fmt, dtype
        self.shard: ShardWriter | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self.fmt == "pt":
            for record in prediction:
                save_atomic(record, self.outdir / f"{safe_name(record['label'])}.pt")
        elif self.fmt == "h5":
            if self.shard is None:
                self.shard = ShardWriter(self.outdir, trainer.global_rank, self.dtype)
            self.shard.write(prediction, [len(seq) for _, seq in batch])
        else:
            parts = self.outdir / ".parts"
            parts.mkdir(exist_ok=True)
            save_atomic(prediction, parts / f"rank{trainer.global_rank}-{uuid.uuid4().hex}.pt")

    def _close(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()


def lightning_device(device: torch.device, devices: int = 1) -> tuple[str, int | list[int]]:
    """(Lightning accelerator, devices) for a torch device: ``cuda:1`` -> ("gpu", [1]); ``cuda`` with
    ``devices`` = N -> ("gpu", N) (DDP over N GPUs); ``cpu`` -> ("cpu", N) (N processes); ``mps`` -> ("mps", 1)."""
    accelerator = {"cuda": "gpu", "cpu": "cpu", "mps": "mps"}[device.type]
    if device.index is not None:
        if devices != 1:
            raise ValueError(f"--device {device} names one GPU; for {devices} GPUs use --device cuda --devices "
                             f"{devices}")
        return accelerator, [device.index]
    return accelerator, devices


def predict_to_dir(
    model: PerformerLM,
    source: Path | Sequence[tuple[str, str]],
    outdir: Path,
    fmt: str = "pt",
    layers: Sequence[int] = (-1,),
    include: Sequence[str] = ("mean",),
    on_long: str = "error",
    contact_head=None,
    precision: str = "32",
    device: str | torch.device = "cpu",
    devices: int = 1,
    toks_per_batch: int = 4096,
    label: str = "accession",
    skip: set[str] = frozenset(),
    dtype: str = "float32",
    block: int = 100_000,
    total: int | None = None,
    verbose: bool = False,
) -> bool:
    """Embed ``source`` (a FASTA path, streamed, or a list of (label, sequence)) except the labels in ``skip``, with
    ``Trainer.predict`` over ``devices`` processes, writing each batch to ``outdir`` as it finishes
    (:class:`EmbeddingWriter`); returns True on the global-zero rank (which merges / links the outputs).
    ``total``: the number of sequences to embed (for the progress bar; counted from a list source when None).
    Lightning's banners and third-party deprecation warnings are shown only when ``verbose``."""
    accelerator, lightning_devices = lightning_device(torch.device(device), devices)
    if total is None:
        total = None if isinstance(source, str | Path) else sum(label not in skip for label, _ in source)
    bar = ItemProgressBar(total) if total is not None else None
    with lightning_notices_silenced(verbose), warnings.catch_warnings():  # scoped: filters restored on exit
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=lightning_devices,
            strategy="ddp" if devices > 1 else "auto",
            precision="32-true",  # EmbeddingTask autocasts itself: Lightning's CPU 16-mixed silently runs bf16
            logger=False,
            callbacks=[EmbeddingWriter(outdir, fmt, dtype)] + ([bar] if bar else []),
            enable_progress_bar=bar is not None,
            use_distributed_sampler=False,  # FastaBatches shards the batches by rank itself
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        task = EmbeddingTask(model, layers, include, on_long, contact_head, precision, dtype)
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")  # batches are lists
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__`")
        trainer.predict(task, datamodule=EmbeddingData(source, toks_per_batch, label, skip, block),
                        return_predictions=False)
    trainer.strategy.barrier()
    return trainer.is_global_zero
