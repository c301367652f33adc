"""Per-protein and per-residue embeddings of a loaded model (the Python API behind ``pp-embed``).

Follows ESM's ``esm-extract`` (facebookresearch/esm, ``scripts/extract.py``)::

    from proteinperformer import load_model, embed
    model = load_model("model.ckpt", device="cpu")
    reps = embed(model, [("P12345", "MKT...")], layers=[-1], include=("mean", "per_tok", "bos"))
    reps["P12345"]["mean"][-1]     # Tensor [D]
    reps["P12345"]["per_tok"][-1]  # Tensor [L, D], one row per residue (no <cls>/<eos>)
    reps["P12345"]["bos"][-1]      # Tensor [D], the <cls> state

Layers: 0 is the embedding layer, i the output of block i, ``depth`` (= -1) the final LayerNorm'ed state.
Results are keyed by the absolute layer, 0..depth, as ESM keys them and as ``pp-embed`` writes them to files
(``layers=[-1]`` on a 6-layer model gives the key ``6``); the per-kind dicts are :class:`Layers`, which also take
a negative key (``[-1]`` = ``[depth]``), so the same indexing works on ``embed()``'s result and on files read back
with :func:`~proteinperformer.inference.embed_files.read_embeddings`.

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

What ``pp-embed`` writes, and how it resumes, is in :mod:`proteinperformer.inference.embed_files`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from proteinperformer.data.fasta import load_fasta
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.model.precision import check_inference_precision, inference_autocast
from proteinperformer.options import INCLUDE
from proteinperformer.progress import track
from proteinperformer.tokenizer import Alphabet

ON_LONG = ("error", "truncate", "chunk")

Embeddings = dict[str, dict[str, dict[int, torch.Tensor]]]  # label -> kind -> layer (0..depth) -> tensor


class Layers(dict):
    """``{layer: tensor}`` keyed by the absolute layer 0..``depth`` (ESM's convention, also in files); a negative
    key counts from the end when ``depth`` is known (``reps["mean"][-1]`` is the last layer)."""

    def __init__(self, items: Mapping[int, torch.Tensor] | Iterable = (), depth: int | None = None) -> None:
        super().__init__(items)
        self.depth = depth

    def _absolute(self, key: object) -> object:
        if isinstance(key, int) and key < 0:
            if self.depth is None:
                raise KeyError(f"layer {key}: a negative layer needs the model's depth, which these embeddings do "
                               f"not record; give the absolute layer, one of {sorted(self)}")
            return key % (self.depth + 1)
        return key

    def __getitem__(self, key: object) -> torch.Tensor:
        layer = self._absolute(key)
        if not super().__contains__(layer):
            raise KeyError(f"layer {key} is not here: these embeddings hold layers {sorted(self)} (0 = embeddings, "
                           f"{self.depth if self.depth is not None else 'depth'} = last); embed it with "
                           "layers= / --repr-layers")
        return super().__getitem__(layer)

    def __contains__(self, key: object) -> bool:
        try:
            return super().__contains__(self._absolute(key))
        except KeyError:
            return False

    def get(self, key: object, default: object = None) -> object:
        return self[key] if key in self else default


class SequenceTooLongError(ValueError):
    """A sequence is longer than the model can embed in one pass and no fallback was chosen."""


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

    Returns [(label, {kind: Layers({layer: tensor})})] in input order, keyed by absolute layer (0..depth; a
    negative key also works), tensors on CPU in fp32: ``mean`` [D],
    ``per_tok`` [L, D] (residues only) and ``bos`` [D]; ``contacts`` is one [L, L] tensor (not per layer), from
    ``contact_head`` (an :class:`~proteinperformer.analysis.contacts.ContactHead`) or the model's own contact
    regression. See the module docstring for ``on_long``.
    ``precision`` "bf16" or "16" runs the forward pass under torch.autocast in that dtype
    (:mod:`proteinperformer.model.precision`); the returned tensors are float32 either way.
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
        out: dict = {k: Layers(depth=model.config.depth) for k in include if k != "contacts"}
        for layer in sorted(set(layer_map.values())):
            hidden = reps[layer].float()  # (P, T, D)
            total = hidden.new_zeros(n_res, hidden.shape[-1])
            count = hidden.new_zeros(n_res, 1)
            for row, start, n in rows:  # sum the windows, then average where they overlap
                total[start : start + n] += hidden[row, 1 : n + 1]
                count[start : start + n] += 1
            per_tok = total / count  # (L, D)
            if "per_tok" in include:
                out["per_tok"][layer] = per_tok.cpu().clone()
            if "mean" in include:
                out["mean"][layer] = per_tok.mean(0).cpu()
            if "bos" in include:
                out["bos"][layer] = hidden[rows[0][0], 0].cpu().clone()
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
        if not Path(contact_head).is_file():
            raise ValueError(f"{contact_head}: no such contact head; run pp-contacts CHECKPOINT --out DIR first (it "
                             "writes DIR/contact_head.json), or give the reference checkpoint's shipped head, "
                             "studies/reference_model/results/card/contacts/contact_head.json")
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
    for idx in track(batches, desc="embed", unit="batch", disable=not progress):
        out.update(embed_batch(model, [records[i] for i in idx], layers, include, on_long, precision, contact_head))
    return {label: out[label] for label, _ in records}
