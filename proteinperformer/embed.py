"""Per-protein and per-residue embeddings from a trained checkpoint: Python API and the ``pp-embed`` CLI.

Follows ESM's ``esm-extract`` (facebookresearch/esm, ``scripts/extract.py``)::

    from proteinperformer.embed import load_model, embed
    model = load_model("model.ckpt", device="cpu")
    reps = embed(model, [("P12345", "MKT...")], layers=[-1], include=("mean", "per_tok", "bos"))
    reps["P12345"]["mean"][-1]     # Tensor [D]
    reps["P12345"]["per_tok"][-1]  # Tensor [L, D], one row per residue (no <cls>/<eos>)
    reps["P12345"]["bos"][-1]      # Tensor [D], the <cls> state

Layers: 0 is the embedding layer, i the output of block i, ``depth`` (= -1) the final LayerNorm'ed state;
negative indices count from the end and the result is keyed by the layers as given.

Batching packs length-sorted sequences by a token budget (ESM's ``get_batch_indices``); padded keys are
excluded from attention, so a sequence embeds the same alone or in a batch. Models with sinusoidal
positions and FAVOR+ attention have no length cap (memory is linear in length). Models with learned
positions accept at most ``max_positions - 2`` residues, and exact-attention models are held to the same
limit (their memory is quadratic); a longer sequence raises :class:`SequenceTooLongError` unless
``on_long="truncate"`` (keep the first residues, as ESM's ``truncation_seq_length``) or ``on_long="chunk"``
(overlapping windows of the maximum length with half-window stride, residue states averaged where
windows overlap, ``bos`` from the first window) is chosen.

``include=("contacts",)`` adds esm-extract's ``contacts``: contact probabilities [L, L] from a logistic head
over the APC-corrected symmetrised attention maps of all layers × heads: the head ``pp-contacts`` fitted and
saved (``contact_head.json``; ``contact_head=`` / ``--contact-head``) or, when none is given, the model's own
contact regression (``model.contact_head``, e.g. an ESM-2 import). Maps are computed per protein (L² memory
per head); not with ``on_long="chunk"``.

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

import argparse
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader
from tqdm import tqdm

from proteinperformer.data.fasta import load_fasta
from proteinperformer.model import ModelConfig, PerformerLM, convert_attention
from proteinperformer.precision import (
    INFERENCE_PRECISIONS,
    PrecisionError,
    check_inference_precision,
    inference_autocast,
)
from proteinperformer.tokenizer import Alphabet

INCLUDE = ("mean", "per_tok", "bos", "contacts")
ON_LONG = ("error", "truncate", "chunk")
FORMATS = ("pt", "h5", "npz")
# esm-extract's key names, used in every output file.
FILE_KEYS = {"mean": "mean_representations", "per_tok": "representations", "bos": "bos_representations",
             "contacts": "contacts"}

Embeddings = dict[str, dict[str, dict[int, torch.Tensor]]]  # label -> kind -> layer -> tensor


class CheckpointError(ValueError):
    """A file is not a readable proteinperformer checkpoint; the message names the file and the keys."""


class SequenceTooLongError(ValueError):
    """A sequence is longer than the model can embed in one pass and no fallback was chosen."""


# ---- loading ------------------------------------------------------------------------------------
def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    attention: str | None = None,
    num_features: int | None = None,
    kernel: str | None = None,
) -> PerformerLM:
    """Load a model for embedding: a ``train.py`` / ``pp-convert`` checkpoint, a fair-esm ESM-2 ``.pt`` file
    (``esm2_t6_8M_UR50D.pt`` ..., with ``-contact-regression.pt`` beside it when present) or a Hugging Face
    ESM directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``).

    ``attention``: None keeps the file's attention (ESM-2 files: exact softmax), "exact" or "favor" swaps it
    (weights kept; FAVOR+ draws ``num_features`` random features per head, default 256, with ``kernel``,
    default "softmax" for ESM-2 and the checkpoint's kernel otherwise; see :func:`convert_attention`).
    Checks strictly: every tensor must be used and every weight filled with the right shape, the alphabet
    must be one this package knows; anything else raises :class:`CheckpointError` naming the file.
    Returns the model in eval mode on ``device``; ``model.alphabet`` is the tokenizer that goes with it.
    """
    from proteinperformer.esm_import import EsmImportError, load_esm, read_torch

    path = Path(path)
    hf_file = path.suffix in (".safetensors", ".bin", ".json") and (path.parent / "config.json").is_file()
    try:
        if path.is_dir() or hf_file:
            model = load_esm(path if path.is_dir() else path.parent, attention=attention or "exact",
                             num_features=num_features or 256, kernel=kernel or "softmax")
            return model.to(device).eval()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        ckpt = read_torch(path)
        if isinstance(ckpt, dict) and "state_dict" not in ckpt and ({"cfg", "args"} & set(ckpt)):
            model = load_esm(path, data=ckpt, attention=attention or "exact", num_features=num_features or 256,
                             kernel=kernel or "softmax")
            return model.to(device).eval()
    except EsmImportError as err:
        msg = str(err).replace("not a readable torch file", "not a readable torch checkpoint")
        raise CheckpointError(msg) from None
    model = _load_project_checkpoint(path, ckpt)
    if attention is not None or num_features is not None or kernel is not None:
        model = convert_attention(model, attention, num_features, kernel)
    return model.to(device).eval()


def _load_project_checkpoint(path: Path, ckpt: object) -> PerformerLM:
    """The PerformerLM of a checkpoint written by ``train.py`` / :func:`export_slim` / ``pp-convert``."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a proteinperformer checkpoint (holds a {type(ckpt).__name__})")
    hparams = ckpt.get("hyper_parameters") or {}
    missing = [k for k in ("state_dict", "hyper_parameters", "alphabet") if k not in ckpt]
    if "hyper_parameters" in ckpt and "config" not in hparams:
        missing.append("hyper_parameters.config")
    if missing:
        raise CheckpointError(
            f"{path}: not a proteinperformer checkpoint: missing {missing}; top-level keys are {sorted(ckpt)} "
            "(expected a proteinperformer checkpoint, a fair-esm ESM-2 .pt with 'model' and 'cfg', or a Hugging "
            "Face ESM directory)"
        )
    try:
        cfg = ModelConfig(**hparams["config"])
        known = Alphabet(cfg.alphabet).all_toks
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: hyper_parameters.config does not fit ModelConfig ({err})") from None
    if list(ckpt["alphabet"]) != known:
        raise CheckpointError(f"{path}: the checkpoint's alphabet {ckpt['alphabet']} differs from this package's "
                              f"{cfg.alphabet!r} alphabet {known}")
    model = PerformerLM(cfg)
    expected = model.state_dict()
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    unexpected = sorted(k for k in ckpt["state_dict"] if not k.startswith("model.") or k[6:] not in expected)
    missing = sorted(f"model.{k}" for k in expected if k not in state)
    shapes = [f"model.{k} {tuple(v.shape)} (config wants {tuple(expected[k].shape)})"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: weights do not match the config {cfg.to_dict()}: missing keys {missing}, "
            f"unexpected keys {unexpected}, wrong shapes {shapes}"
        )
    model.load_state_dict(state, strict=True)
    return model


def export_slim(src: str | Path, dst: str | Path) -> Path:
    """Write a copy of checkpoint ``src`` with only weights, hyper-parameters, alphabet and step counters
    (no optimiser or callback state) to ``dst`` (temp file + rename); returns ``dst``. The copy loads with
    :func:`load_model` and ``ProteinLM.load_from_checkpoint`` (for evaluation, not for resuming training)."""
    load_model(src)  # validate first
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    keep = ("state_dict", "hyper_parameters", "alphabet", "pytorch-lightning_version", "epoch", "global_step")
    slim = {k: ckpt[k] for k in keep if k in ckpt}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    torch.save(slim, tmp)
    os.replace(tmp, dst)
    return dst


# ---- inputs and batching ------------------------------------------------------------------------
def as_records(sequences: Sequence[tuple[str, str]] | Mapping[str, str] | str | Path) -> list[tuple[str, str]]:
    """Normalise input to a list of (label, sequence): a list of pairs, a {label: sequence} dict or a FASTA
    path. Sequences are validated with the alphabet (a terminal ``*`` is dropped); duplicate labels raise."""
    alphabet = Alphabet()
    if isinstance(sequences, str | Path):
        return [(r.id, r.sequence.removesuffix("*")) for r in load_fasta(sequences, alphabet)]
    pairs = list(sequences.items()) if isinstance(sequences, Mapping) else list(sequences)
    seen: dict[str, int] = {}
    records = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"item {i}: expected a (label, sequence) pair, got {pair!r:.80}")
        label, seq = str(pair[0]), str(pair[1]).removesuffix("*")
        if label in seen:
            raise ValueError(f"duplicate label {label!r} at items {seen[label]} and {i}; labels must be unique")
        seen[label] = i
        if not seq:
            raise ValueError(f"item {i} ({label!r}): empty sequence")
        alphabet.encode(seq, label)  # raises TokenizationError naming label and position
        records.append((label, seq))
    return records


def batch_indices(lengths: Sequence[int], toks_per_batch: int, extra_toks_per_seq: int = 2) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest) stays within ``toks_per_batch`` tokens,
    after sorting by length (ESM's ``FastaBatchedDataset.get_batch_indices``); a sequence longer than the
    budget gets a batch of its own."""
    batches: list[list[int]] = []
    buf: list[int] = []
    width = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        size = lengths[i] + extra_toks_per_seq
        if buf and max(width, size) * (len(buf) + 1) > toks_per_batch:
            batches.append(buf)
            buf, width = [], 0
        buf.append(i)
        width = max(width, size)
    if buf:
        batches.append(buf)
    return batches


def residue_limit(cfg: ModelConfig) -> int | None:
    """Most residues one forward pass takes: ``max_positions - 2`` for learned positions or exact attention,
    None (no cap) for FAVOR+ with sinusoidal positions."""
    if cfg.positions == "learned" or cfg.attention == "exact":
        return cfg.max_positions - 2
    return None


def resolve_layers(layers: Iterable[int], depth: int) -> dict[int, int]:
    """Map each requested layer to its index in 0..depth (negative = from the end); raises if out of range."""
    out = {}
    for layer in layers:
        if not -(depth + 1) <= int(layer) <= depth:
            raise ValueError(f"layer {layer} out of range for a model of depth {depth} "
                             f"(valid: {-(depth + 1)}..{depth})")
        out[int(layer)] = int(layer) % (depth + 1)
    if not out:
        raise ValueError("no layers requested")
    return out


def _windows(length: int, size: int) -> list[int]:
    """Start offsets of windows of ``size`` covering ``length`` residues with stride size // 2."""
    stride = max(size // 2, 1)
    starts = list(range(0, length - size, stride))
    return [*starts, length - size]


# ---- the forward pass ---------------------------------------------------------------------------
@torch.inference_mode()
def embed_batch(
    model: PerformerLM,
    batch: Sequence[tuple[str, str]],
    layers: Iterable[int] = (-1,),
    include: Iterable[str] = ("mean",),
    on_long: str = "error",
    precision: str = "32",
    contact_head=None,
) -> list[tuple[str, dict[str, dict[int, torch.Tensor]]]]:
    """Embed one batch of (label, sequence) in a single padded forward pass.

    Returns [(label, {kind: {layer: tensor}})] in input order, tensors on CPU in fp32: ``mean`` [D],
    ``per_tok`` [L, D] (residues only) and ``bos`` [D]; ``contacts`` is one [L, L] tensor (not per layer), from
    ``contact_head`` (an :class:`~proteinperformer.analysis.contacts.ContactHead`) or the model's own contact
    regression. See the module docstring for ``on_long``.
    ``precision`` "bf16" or "16" runs the forward pass under torch.autocast in that dtype
    (:mod:`proteinperformer.precision`); the returned tensors are float32 either way.
    """
    include = tuple(include)
    if bad := [k for k in include if k not in INCLUDE]:
        raise ValueError(f"include: unknown {bad}; choose from {INCLUDE}")
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    if "contacts" in include:
        contact_head = resolve_contact_head(model, contact_head)
        if on_long == "chunk":
            raise ValueError("contacts need the whole protein in one pass: use on_long='truncate' (or 'error')")
    layer_map = resolve_layers(layers, model.config.depth)
    limit = residue_limit(model.config)
    pieces: list[tuple[int, int, str]] = []  # (item, start residue, subsequence)
    for item, (label, seq) in enumerate(batch):
        if limit is None or len(seq) <= limit:
            pieces.append((item, 0, seq))
        elif on_long == "truncate":
            pieces.append((item, 0, seq[:limit]))
        elif on_long == "chunk":
            pieces.extend((item, s, seq[s : s + limit]) for s in _windows(len(seq), limit))
        else:
            raise SequenceTooLongError(
                f"sequence {label!r} has {len(seq)} residues but this model takes at most {limit} "
                f"({model.config.positions} positions, {model.config.attention} attention, "
                f"max_positions={model.config.max_positions}); use on_long='truncate' / --truncate to keep the "
                f"first {limit} residues, or on_long='chunk' / --chunk for overlapping windows"
            )
    device = next(model.parameters()).device
    _, _, tokens = model.alphabet.get_batch_converter()([(str(i), s) for i, _, s in pieces])  # (P, T)
    with inference_autocast(precision, device):
        reps = model(tokens.to(device), repr_layers=sorted(set(layer_map.values())))["representations"]

    results = []
    for item, (label, seq) in enumerate(batch):
        n_res = min(len(seq), limit) if on_long == "truncate" and limit is not None else len(seq)
        rows = [(row, start, len(sub)) for row, (it, start, sub) in enumerate(pieces) if it == item]
        out: dict[str, dict[int, torch.Tensor]] = {k: {} for k in include}
        for given, layer in layer_map.items():
            hidden = reps[layer].float()  # (P, T, D)
            total = hidden.new_zeros(n_res, hidden.shape[-1])
            count = hidden.new_zeros(n_res, 1)
            for row, start, n in rows:  # sum the windows, then average where they overlap
                total[start : start + n] += hidden[row, 1 : n + 1]
                count[start : start + n] += 1
            per_tok = total / count  # (L, D)
            if "per_tok" in include:
                out["per_tok"][given] = per_tok.cpu().clone()
            if "mean" in include:
                out["mean"][given] = per_tok.mean(0).cpu()
            if "bos" in include:
                out["bos"][given] = hidden[rows[0][0], 0].cpu().clone()
        if "contacts" in include:
            from proteinperformer.analysis.contacts import predict_contact_map

            out["contacts"] = torch.from_numpy(predict_contact_map(model, seq[:n_res], contact_head))
        results.append((label, out))
    return results


def resolve_contact_head(model: PerformerLM, contact_head=None):
    """The contact head to use: ``contact_head`` (a ContactHead or the path of a ``contact_head.json`` from
    ``pp-contacts``), else the model's own contact regression; raises ValueError when there is none."""
    from proteinperformer.analysis.contacts import ContactHead

    if isinstance(contact_head, str | Path):
        contact_head = ContactHead.load(contact_head)
    head = contact_head or ContactHead.of_model(model)
    if head is None:
        raise ValueError("include 'contacts' needs a contact head: pass the contact_head.json that pp-contacts "
                         "writes (--contact-head) or use a model with its own contact regression (ESM-2 import)")
    if head.layers * head.heads != model.config.depth * model.config.heads:
        raise ValueError(f"contact head {head.source or ''} was fitted for {head.layers} layers x {head.heads} "
                         f"heads; this model has {model.config.depth} x {model.config.heads}")
    return head


def embed(
    model: PerformerLM,
    sequences: Sequence[tuple[str, str]] | Mapping[str, str] | str | Path,
    layers: Iterable[int] = (-1,),
    include: Iterable[str] = ("mean",),
    toks_per_batch: int = 4096,
    on_long: str = "error",
    progress: bool = False,
    precision: str = "32",
    contact_head=None,
) -> Embeddings:
    """Embed sequences (list of (label, seq), {label: seq} or a FASTA path) in token-budget batches.

    Returns ``{label: {kind: {layer: tensor}}}`` in input order; see :func:`embed_batch` for shapes and
    ``precision`` ("32", "bf16", "16").
    """
    records = as_records(sequences)
    layers = list(layers)
    resolve_layers(layers, model.config.depth)  # fail before any work
    check_inference_precision(precision, next(model.parameters()).device)
    if "contacts" in include:
        contact_head = resolve_contact_head(model, contact_head)  # fail before any work
    out: Embeddings = {}
    batches = batch_indices([len(s) for _, s in records], toks_per_batch)
    for idx in tqdm(batches, desc="embed", unit="batch", disable=not progress):
        out.update(embed_batch(model, [records[i] for i in idx], layers, include, on_long, precision, contact_head))
    return {label: out[label] for label, _ in records}


# ---- output files -------------------------------------------------------------------------------
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


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def bundle_path(outdir: Path, fmt: str) -> Path:
    """The single output file of the ``h5`` / ``npz`` formats."""
    return outdir / f"embeddings.{fmt}"


def _read_bundle(path: Path) -> dict[str, dict]:
    """Read an embeddings.h5/.npz back into {label: file record}."""
    from urllib.parse import unquote

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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    if path.suffix == ".npz":
        np.savez(tmp, **flat)
    else:
        import h5py

        with h5py.File(tmp, "w") as f:
            for key, array in flat.items():
                f.create_dataset(key, data=array)
    os.replace(tmp, path)


def done_labels(outdir: Path, fmt: str) -> set[str]:
    """Labels already written to ``outdir`` (finished files and part files of an interrupted run)."""
    from urllib.parse import unquote

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
                _save_atomic(record, self.outdir / f"{safe_name(record['label'])}.pt")
        else:
            parts = self.outdir / ".parts"
            parts.mkdir(exist_ok=True)
            _save_atomic(prediction, parts / f"rank{trainer.global_rank}-{uuid.uuid4().hex}.pt")


# ---- CLI ----------------------------------------------------------------------------------------
def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pp-embed",
        description="Extract per-sequence / per-residue representations from a proteinperformer checkpoint "
        "(like esm-extract). Resumable: labels already in OUTDIR are skipped.",
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by pp-train (or a slim export)")
    parser.add_argument("fasta", type=Path, help="FASTA file (.gz ok); record ids are the labels")
    parser.add_argument("outdir", type=Path, help="output directory (created)")
    parser.add_argument("--repr-layers", "--repr_layers", type=int, nargs="+", default=[-1],
                        help="layers to return: 0 = embeddings, -1 = final (default -1)")
    parser.add_argument("--include", nargs="+", choices=INCLUDE, default=["mean"], help="what to save")
    parser.add_argument("--contact-head", type=Path, default=None,
                        help="for --include contacts: the contact_head.json pp-contacts wrote (default: the "
                        "model's own contact regression, e.g. an ESM-2 import)")
    parser.add_argument("--toks-per-batch", "--toks_per_batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--format", choices=FORMATS, default="pt", help="pt: a file per label; h5/npz: one file")
    long = parser.add_mutually_exclusive_group()
    long.add_argument("--truncate", action="store_true", help="keep the first residues of too-long sequences")
    long.add_argument("--chunk", action="store_true", help="embed too-long sequences in overlapping windows")
    parser.add_argument("--device", default="cpu", help="accelerator: cpu, gpu/cuda, mps or auto")
    parser.add_argument("--devices", type=int, default=1, help="number of devices (>1 runs DDP)")
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="32",
                        help="32, or autocast to bf16 / 16 (fp16) for speed and memory (default 32)")
    parser.add_argument("--attention", choices=("exact", "favor"), default=None,
                        help="swap the model's attention (weights kept): favor = FAVOR+, linear memory, no length "
                        "cap (e.g. an ESM-2 file on a 35,000-residue protein); default: as in the file")
    parser.add_argument("--num-features", type=int, default=None, help="FAVOR+ random features per head (256)")
    parser.add_argument("--kernel", choices=("softmax", "relu"), default=None,
                        help="FAVOR+ kernel when swapping (default softmax for ESM-2, else the checkpoint's)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Embed every FASTA record not yet in ``args.outdir``; returns the number of sequences embedded."""
    check_inference_precision(args.precision, args.device if args.device != "auto" else "cpu")
    model = load_model(args.checkpoint, attention=args.attention, num_features=args.num_features, kernel=args.kernel)
    layers = list(args.repr_layers)
    resolve_layers(layers, model.config.depth)
    contact_head = resolve_contact_head(model, args.contact_head) if "contacts" in args.include else None
    if contact_head is not None and args.chunk:
        raise ValueError("--include contacts needs the whole protein in one pass: use --truncate, not --chunk")
    records = as_records(args.fasta)
    args.outdir.mkdir(parents=True, exist_ok=True)
    done = done_labels(args.outdir, args.format)
    todo = [r for r in records if r[0] not in done]
    print(f"{len(records)} sequences in {args.fasta}; {len(done & {r[0] for r in records})} already in "
          f"{args.outdir}, {len(todo)} to embed")
    on_long = "truncate" if args.truncate else "chunk" if args.chunk else "error"
    accelerator = "gpu" if args.device == "cuda" else args.device
    if todo:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=args.devices,
            strategy="ddp" if args.devices > 1 else "auto",
            precision="32-true",  # EmbeddingTask autocasts itself: Lightning's CPU 16-mixed silently runs bf16
            logger=False,
            callbacks=[EmbeddingWriter(args.outdir, args.format)],
            use_distributed_sampler=False,  # EmbeddingData shards the batches by rank itself
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        task = EmbeddingTask(model, layers, args.include, on_long, contact_head, args.precision)
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")  # batches are lists
        trainer.predict(task, datamodule=EmbeddingData(todo, args.toks_per_batch), return_predictions=False)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return len(todo)
    if args.format != "pt":
        n = merge_parts(args.outdir, args.format)
        print(f"{n} labels in {bundle_path(args.outdir, args.format)}")
    return len(todo)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run(create_parser().parse_args(argv))
    except PrecisionError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
