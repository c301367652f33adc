"""Residue contacts from attention, as in ESM (Rao et al. 2021, "Transformer protein language models are
unsupervised structure learners").

Every (layer, head) map is made symmetric (A + Aᵀ) and corrected with the average product correction
(APC, Dunn et al. 2008: F − F·1 1ᵀF / 1ᵀF1, which removes the "popular residue" background); the
layers × heads values of a residue pair are the features of a logistic regression fitted on a few solved
structures (20 in ESM) and evaluated on others. Two residues are in contact when their Cβ atoms (or Cα)
are closer than 8 Å. Precision of the top L, L/2, L/5 predictions is reported for medium-range
(12 ≤ |i−j| < 24) and long-range (|i−j| ≥ 24) pairs, next to the background rate (the precision of a random
guess: the fraction of pairs in that range that are contacts).

The fitted regression is a :class:`ContactHead` (feature means and scales, coefficients, intercept), which
``pp-contacts`` saves as ``contact_head.json`` and ``pp-embed --include contacts --contact-head`` applies; an
imported model's own contact regression (``model.contact_head``, an ``nn.Linear(layers × heads, 1)`` as in ESM-2)
is the same head without standardisation (:meth:`ContactHead.of_model`).
"""

from __future__ import annotations

import inspect
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from proteinperformer.analysis.maps import as_performer, attention_maps
from proteinperformer.files import write_json_atomic
from proteinperformer.progress import track

RANGES = {"medium": (12, 24), "long": (24, None)}  # [min, max) sequence separation
TOP_FRACTIONS = {"L": 1, "L/2": 2, "L/5": 5}


@dataclass
class Chain:
    """One PDB chain: id (``PDBID_CHAIN``), sequence (length L), Cα and virtual Cβ coordinates [L, 3] in Å."""

    id: str
    sequence: str
    ca: np.ndarray
    cb: np.ndarray


def load_structures(path: str | Path) -> list[Chain]:
    """Read chains from an ``.npz`` in the layout of ``pdb_chains.npz`` (ids, seqs, offsets, ca, cb)."""
    # Read every array once: each ``z[key]`` of an NpzFile decompresses the whole array again, and slices
    # of it would keep one full copy alive per chain (3,421 chains of pdb_chains.npz filled 24 GiB).
    layout = "an .npz of chains in the pdb_chains.npz layout (ids, seqs, offsets, ca, cb), e.g. " \
        "data/structures/pdb_chains_subset60.npz"
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file; give {layout}")
    if not zipfile.is_zipfile(path):  # np.load would take a FASTA for a pickle and say so
        raise ValueError(f"{path}: not {layout}")
    with np.load(path, allow_pickle=False) as z:
        if missing := [k for k in ("ids", "seqs", "offsets", "ca", "cb") if k not in z.files]:
            raise ValueError(f"{path}: no arrays {missing}; give {layout}")
        ids, seqs, off, ca, cb = (z[key] for key in ("ids", "seqs", "offsets", "ca", "cb"))
    return [
        Chain(str(ids[i]), str(seqs[i]), ca[off[i] : off[i + 1]].copy(), cb[off[i] : off[i + 1]].copy())
        for i in range(len(ids))
    ]


def contact_map(coords: np.ndarray, threshold: float = 8.0) -> np.ndarray:
    """[L, 3] coordinates -> [L, L] bool, True where two residues are closer than ``threshold`` Å."""
    c = np.asarray(coords, dtype=np.float64)
    return np.linalg.norm(c[:, None] - c[None], axis=-1) < threshold


def symmetrize(x: torch.Tensor) -> torch.Tensor:
    """[..., L, L] -> x + xᵀ over the last two axes."""
    return x + x.transpose(-1, -2)


def apc(x: torch.Tensor) -> torch.Tensor:
    """Average product correction over the last two axes: x − (row sums)(column sums) / total. [..., L, L]."""
    rows = x.sum(-1, keepdim=True)
    cols = x.sum(-2, keepdim=True)
    total = x.sum((-1, -2), keepdim=True)
    return x - rows * cols / total


def contact_features(model: torch.nn.Module, sequence: str) -> np.ndarray:
    """APC-corrected symmetrised attention of every layer and head: [layers × heads, L, L] float32."""
    maps = attention_maps(model, sequence)  # [layers, heads, L, L]
    L = maps.shape[-1]
    return apc(symmetrize(maps.float().cpu())).reshape(-1, L, L).numpy()


def pair_mask(L: int, min_sep: int, max_sep: int | None = None) -> np.ndarray:
    """[L, L] bool: upper-triangle pairs i < j with min_sep ≤ j − i (< max_sep if given)."""
    sep = np.arange(L)[None] - np.arange(L)[:, None]
    mask = sep >= min_sep
    if max_sep is not None:
        mask &= sep < max_sep
    return mask


def fit_contact_regression(
    features: list[np.ndarray], contacts: list[np.ndarray], min_sep: int = 6, C: float = 0.15
) -> Pipeline:
    """L1-penalised logistic regression from per-pair attention features to contact (as ESM), on
    standardised features (so the penalty does not depend on the scale of a model's attention).

    Args:
        features: per chain [F, L, L] (F = layers × heads); contacts: per chain [L, L] bool.
        min_sep: only pairs with j − i ≥ min_sep are used for fitting.
        C: inverse L1 strength (ESM: 0.15).
    """
    xs, ys = [], []
    for f, c in zip(features, contacts, strict=True):
        m = pair_mask(c.shape[0], min_sep)
        xs.append(f[:, m].T)
        ys.append(c[m])
    return _l1_logistic(C).fit(np.concatenate(xs), np.concatenate(ys).astype(int))


def _l1_logistic(C: float) -> Pipeline:
    """Standardise features, then L1 logistic regression (``l1_ratio`` since scikit-learn 1.8, else ``penalty``)."""
    l1 = {"l1_ratio": 1.0} if "deprecated" in str(inspect.signature(LogisticRegression).parameters["penalty"]) else {
        "penalty": "l1"}
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="liblinear", max_iter=1000, **l1))


def predict_contacts(reg: Pipeline, features: np.ndarray) -> np.ndarray:
    """Contact probabilities [L, L] (symmetric) from features [F, L, L]."""
    F, L, _ = features.shape
    p = reg.predict_proba(features.reshape(F, -1).T)[:, 1].reshape(L, L)
    return (p + p.T) / 2


@dataclass
class ContactHead:
    """Logistic regression from a residue pair's layers × heads APC-corrected symmetrised attention to P(contact).

    P = sigmoid(Σ_f coef[f] · (x[f] − mean[f]) / scale[f] + intercept), features in (layer, head) order.
    """

    layers: int
    heads: int
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    source: str = ""

    @classmethod
    def from_pipeline(cls, reg: Pipeline, layers: int, heads: int, source: str = "") -> ContactHead:
        """The head of a fitted ``StandardScaler -> LogisticRegression`` pipeline (:func:`fit_contact_regression`)."""
        scaler, lr = reg[0], reg[-1]
        return cls(layers, heads, scaler.mean_.tolist(), scaler.scale_.tolist(), lr.coef_[0].tolist(),
                   float(lr.intercept_[0]), source)

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> ContactHead | None:
        """The model's own contact regression (``contact_head``: ``nn.Linear(layers·heads, 1)``), or None."""
        net = as_performer(model)
        linear = getattr(net, "contact_head", None)
        if linear is None:
            return None
        n = net.config.depth * net.config.heads
        weight, bias = linear.weight.detach().float().reshape(-1), linear.bias.detach().float().reshape(-1)
        return cls(net.config.depth, net.config.heads, [0.0] * n, [1.0] * n, weight.tolist(), float(bias[0]),
                   "model.contact_head")

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Contact probabilities [L, L] (symmetric) from features [layers·heads, L, L]."""
        F, L, _ = features.shape
        if F != self.layers * self.heads:
            raise ValueError(f"contact head wants {self.layers} x {self.heads} = {self.layers * self.heads} "
                             f"attention maps per pair, got {F} (a head fitted on another architecture?)")
        z = (features.reshape(F, -1).T.astype(np.float64) - self.mean) / self.scale
        p = 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept))).reshape(L, L)
        return ((p + p.T) / 2).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write the head as JSON (temp file + rename)."""
        return write_json_atomic(path, {"format": "proteinperformer.contact_head/1", **asdict(self)}, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> ContactHead:
        """Read a head written by :meth:`save` (``pp-contacts`` writes ``contact_head.json``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.pop("format", None) != "proteinperformer.contact_head/1":
                raise ValueError("no 'format': 'proteinperformer.contact_head/1' entry")
            head = cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a contact head written by pp-contacts ({err})") from None
        n = head.layers * head.heads
        if not len(head.mean) == len(head.scale) == len(head.coef) == n:
            raise ValueError(f"{path}: {head.layers} x {head.heads} heads but {len(head.coef)} coefficients")
        return head


def predict_contact_map(model: torch.nn.Module, sequence: str, head: ContactHead | None = None) -> np.ndarray:
    """Contact probabilities of one protein: [L, L] float32, from ``head`` or else the model's own contact
    regression; raises ValueError when there is neither."""
    head = head or ContactHead.of_model(model)
    if head is None:
        raise ValueError("no contact head: pass one fitted by pp-contacts (contact_head.json, --contact-head) or "
                         "use a model with its own contact regression (an ESM-2 import with -contact-regression.pt)")
    return head.predict(contact_features(model, sequence))


def precision_at(
    scores: np.ndarray, contacts: np.ndarray, min_sep: int, max_sep: int | None = None, fraction: int = 1
) -> float:
    """Precision of the top ⌊L / fraction⌋ scored pairs (i < j, separation in [min_sep, max_sep)).

    scores, contacts: [L, L]. Ties are broken by position (stable sort). NaN if no pair is in range.
    """
    L = contacts.shape[0]
    m = pair_mask(L, min_sep, max_sep)
    s, c = scores[m], contacts[m]
    if len(s) == 0:
        return float("nan")
    k = max(1, min(len(s), L // fraction))
    top = np.argsort(-s, kind="stable")[:k]
    return float(c[top].mean())


def background_rate(contacts: np.ndarray, min_sep: int, max_sep: int | None = None) -> float:
    """Fraction of pairs in the separation range that are contacts (the precision of a random ranking)."""
    c = contacts[pair_mask(contacts.shape[0], min_sep, max_sep)]
    return float(c.mean()) if len(c) else float("nan")


def contact_precisions(scores: np.ndarray, contacts: np.ndarray) -> dict:
    """Precision at L, L/2, L/5 and background for the medium and long ranges of one chain.

    Returns ``{"long": {"L": p, "L/2": p, "L/5": p, "background": b}, "medium": {...}}``.
    """
    out = {}
    for name, (lo, hi) in RANGES.items():
        out[name] = {k: precision_at(scores, contacts, lo, hi, f) for k, f in TOP_FRACTIONS.items()}
        out[name]["background"] = background_rate(contacts, lo, hi)
    return out


def mean_precisions(per_chain: list[dict]) -> dict:
    """Average :func:`contact_precisions` results over chains (NaN entries skipped)."""
    return {
        rng: {k: float(np.nanmean([p[rng][k] for p in per_chain])) for k in per_chain[0][rng]} for rng in RANGES
    }


def evaluate_contacts(
    model: torch.nn.Module,
    chains: list[Chain],
    n_train: int = 20,
    atom: str = "cb",
    threshold: float = 8.0,
    max_len: int | None = 512,
    progress: bool = False,
) -> dict:
    """Fit the contact regression on the first ``n_train`` chains and evaluate on the rest.

    Chains longer than ``max_len`` are skipped. Returns a dict with "mean" (averaged precisions),
    "per_chain" (id, L, precisions), "regression" (the fitted pipeline), "coef" [layers, heads]
    (on standardised features), "head" (the :class:`ContactHead`) and, for plotting, "example" (id, predicted
    probabilities, true contacts) of the first test chain.
    """
    if atom not in ("cb", "ca"):
        raise ValueError(f"atom must be 'cb' or 'ca', got {atom!r}")
    chains = [c for c in chains if max_len is None or len(c.sequence) <= max_len]
    if len(chains) <= n_train:
        raise ValueError(f"need more than {n_train} chains (got {len(chains)}) to train and test")
    feats = [contact_features(model, c.sequence)
             for c in track(chains, desc="contact features", unit="chain", disable=not progress, leave=False)]
    truth = [contact_map(getattr(c, atom), threshold) for c in chains]
    reg = fit_contact_regression(feats[:n_train], truth[:n_train])
    per_chain = []
    example = None
    for c, f, t in zip(chains[n_train:], feats[n_train:], truth[n_train:], strict=True):
        probs = predict_contacts(reg, f)
        per_chain.append({"id": c.id, "length": len(c.sequence), **contact_precisions(probs, t)})
        if example is None:
            example = {"id": c.id, "sequence": c.sequence, "predicted": probs, "true": t}
    net_cfg = as_performer(model).config
    return {
        "mean": mean_precisions(per_chain),
        "per_chain": per_chain,
        "regression": reg,
        "head": ContactHead.from_pipeline(reg, net_cfg.depth, net_cfg.heads),
        "coef": reg[-1].coef_.reshape(net_cfg.depth, net_cfg.heads),
        "example": example,
        "n_train": n_train,
        "n_test": len(per_chain),
    }
