"""The files ``pp-embed`` writes, and the Lightning predict loop that writes them as batches finish.

The CLI (``pp-embed CHECKPOINT FASTA OUTDIR``) runs through Lightning ``Trainer.predict`` so ``--devices
N`` shards batches over N processes (DDP); an :class:`EmbeddingWriter` writes as batches finish, so a
killed run resumes where it stopped. Output formats:

- ``pt`` (default): one ``OUTDIR/<label>.pt`` per sequence as esm-extract writes it: ``{"label",
  "representations": {layer: [L, D]}, "mean_representations": {layer: [D]}, "bos_representations":
  {layer: [D]}, "contacts": [L, L]}`` with non-negative layer numbers (-1 is written as ``depth``, as
  esm-extract does).
- ``h5`` / ``npz``: one ``OUTDIR/embeddings.h5|npz`` with datasets ``<label>/<kind>/<layer>`` (kind as
  in ``pt``). Ranks write part files under ``OUTDIR/.parts/`` which rank 0 merges at the end; the merge
  holds the whole collection in memory, so use ``pt`` for millions of sequences.

File names and keys escape a label with URL percent-encoding (:func:`safe_name`): letters, digits and
``_.-~`` stay, anything else (``/``, ``|``, spaces, ...) becomes ``%XX``, and a leading ``.`` is escaped
so no label makes a hidden file or ``..``. Decode with ``urllib.parse.unquote``.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from proteinperformer.checkpoints import save_atomic
from proteinperformer.files import write_atomic
from proteinperformer.inference.embed import batch_indices, embed_batch
from proteinperformer.model import PerformerLM
from proteinperformer.progress import progress_bar

FORMATS = ("pt", "h5", "npz")
# esm-extract's key names, used in every output file.
FILE_KEYS = {"mean": "mean_representations", "per_tok": "representations", "bos": "bos_representations",
             "contacts": "contacts"}


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


def read_embeddings(outdir: str | Path, fmt: str = "pt") -> dict[str, dict]:
    """Load what ``pp-embed`` wrote to ``outdir`` as {label: esm-extract style record}."""
    outdir = Path(outdir)
    if fmt == "pt":
        return {r["label"]: r for r in (torch.load(p, weights_only=True) for p in sorted(outdir.glob("*.pt")))}
    return _read_bundle(bundle_path(outdir, fmt))


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
    done = set(_read_bundle(bundle_path(outdir, fmt))) if bundle_path(outdir, fmt).exists() else set()
    for part in sorted((outdir / ".parts").glob("*.pt")):
        done.update(r["label"] for r in torch.load(part, weights_only=True))
    return done


def merge_parts(outdir: Path, fmt: str) -> int:
    """Fold the part files of all ranks (and any earlier bundle) into ``embeddings.<fmt>``; returns #labels."""
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


# ---- Lightning predict (multi-device) -----------------------------------------------------------
class EmbeddingTask(pl.LightningModule):
    """Wraps a PerformerLM for ``Trainer.predict``: each batch is a list of (label, sequence)."""

    def __init__(self, model: PerformerLM, layers: Sequence[int], include: Sequence[str], on_long: str,
                 contact_head=None, precision: str = "32") -> None:
        super().__init__()
        self.model, self.layers, self.include, self.on_long = model, list(layers), tuple(include), on_long
        self.contact_head, self.precision = contact_head, precision

    def predict_step(self, batch: list[tuple[str, str]], batch_idx: int) -> list[dict]:
        reps = embed_batch(self.model, batch, self.layers, self.include, self.on_long, precision=self.precision,
                           contact_head=self.contact_head)
        return [to_file_record(label, r, self.model.config.depth) for label, r in reps]


def _identity(batch):
    return batch


class EmbeddingData(pl.LightningDataModule):
    """Token-budget batches of (label, sequence); each rank takes every world_size-th batch."""

    def __init__(self, records: list[tuple[str, str]], toks_per_batch: int) -> None:
        super().__init__()
        self.records, self.toks_per_batch = records, toks_per_batch

    def predict_dataloader(self) -> DataLoader:
        batches = batch_indices([len(s) for _, s in self.records], self.toks_per_batch)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        mine = [[self.records[i] for i in idx] for idx in batches[rank::world]]
        return DataLoader(mine, batch_size=None, shuffle=False, collate_fn=_identity)


class EmbeddingWriter(BasePredictionWriter):
    """Writes each predicted batch at once: ``pt`` -> one file per label; ``h5``/``npz`` -> a per-rank part
    file under ``OUTDIR/.parts/`` (merged by :func:`merge_parts`). Every file goes through temp + rename."""

    def __init__(self, outdir: Path, fmt: str) -> None:
        super().__init__(write_interval="batch")
        self.outdir, self.fmt = Path(outdir), fmt

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self.fmt == "pt":
            for record in prediction:
                save_atomic(record, self.outdir / f"{safe_name(record['label'])}.pt")
        else:
            parts = self.outdir / ".parts"
            parts.mkdir(exist_ok=True)
            save_atomic(prediction, parts / f"rank{trainer.global_rank}-{uuid.uuid4().hex}.pt")


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
    records: list[tuple[str, str]],
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
) -> bool:
    """Embed ``records`` with ``Trainer.predict`` over ``devices`` processes, writing each batch to ``outdir`` as
    it finishes (:class:`EmbeddingWriter`); returns True on the global-zero rank (which merges h5/npz parts)."""
    accelerator, lightning_devices = lightning_device(torch.device(device), devices)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=lightning_devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="32-true",  # EmbeddingTask autocasts itself: Lightning's CPU 16-mixed silently runs bf16
        logger=False,
        callbacks=[EmbeddingWriter(outdir, fmt), progress_bar()],
        use_distributed_sampler=False,  # EmbeddingData shards the batches by rank itself
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    task = EmbeddingTask(model, layers, include, on_long, contact_head, precision)
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")  # batches are lists
    trainer.predict(task, datamodule=EmbeddingData(records, toks_per_batch), return_predictions=False)
    trainer.strategy.barrier()
    return trainer.is_global_zero
