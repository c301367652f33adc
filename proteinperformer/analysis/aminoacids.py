"""Amino-acid view of attention, after Vig et al. 2020 ("BERTology meets biology", §4.3).

Two ways to say which amino acids each head attends to, computed in one pass over a set of proteins
(:func:`attention_counts`):

* **Vig et al.'s published method** (salesforce/provis, paper v2; the default of ``pp-attention-blosum``):
  binarise attention at weight ≥ 0.3 (``VIG_THRESHOLD``), count for every head how many of those
  high-confidence edges point *to* each amino acid (the attending residue is ignored), drop heads with fewer than
  100 such edges (``VIG_MIN_EDGES``), and take the fraction of a head's edges landing on each amino acid
  (:func:`binarised_target_counts`, :func:`vig_fractions`). Edges to rare letters (X, B, Z, U, O) count in a head's
  total but belong to no amino acid.
* **attention-weighted** (this project's earlier variant): the fraction of a head's attention mass that lands on
  each amino acid, from attention-weighted pair counts [layers, heads, 20, 20] (:func:`pair_counts`,
  :func:`attention_fractions`); every head is kept.

From a [heads, 20] fraction table: the similarity of two amino acids = Pearson correlation of their per-head
fractions across heads (amino acids that the same heads look at are "similar" to the model), and its agreement with
a substitution matrix (BLOSUM62 by default, or any Biopython matrix) = Pearson r between the two 20×20 matrices
over the 190 off-diagonal pairs.

A randomly initialised model of the same shape gives the null (Vig et al.: −0.05 … 0.21; trained 0.60–0.75).
FAVOR+ spreads attention thinly over long proteins, so few of its weights reach 0.3: the number of surviving
heads is reported, and the threshold is never lowered silently.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from Bio.Align import substitution_matrices
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from proteinperformer.analysis.maps import as_performer, iter_attention_blocks
from proteinperformer.model import PerformerLM
from proteinperformer.options import VIG_MIN_EDGES, VIG_THRESHOLD
from proteinperformer.progress import track

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the 20 standard residues, in the order of every 20-axis here
_INDEX = {aa: i for i, aa in enumerate(AMINO_ACIDS)}


def residue_onehot(sequence: str) -> torch.Tensor:
    """[L, 20] float one-hot of the 20 standard residues; rare letters (X, B, Z, U, O) get an all-zero row."""
    out = torch.zeros(len(sequence), 20)
    for i, aa in enumerate(sequence.upper()):
        j = _INDEX.get(aa)
        if j is not None:
            out[i, j] = 1.0
    return out


def pair_counts_from_maps(sequence: str, maps: torch.Tensor) -> torch.Tensor:
    """Attention-weighted residue-type pair counts of one protein.

    Args:
        sequence: residues, length L.
        maps: [..., L, L] attention (query rows, key columns), e.g. [layers, heads, L, L].
    Returns:
        [..., 20, 20]: ``C[..., a, b] = Σ_{i: x_i = a} Σ_{j: x_j = b} maps[..., i, j]``.
    """
    onehot = residue_onehot(sequence)
    return onehot.T @ maps.float() @ onehot


def target_onehot(sequence: str) -> torch.Tensor:
    """[L, 21] one-hot of the attended-to residue: the 20 standard residues, then one column for rare letters."""
    out = torch.zeros(len(sequence), 21)
    out[torch.arange(len(sequence)), [_INDEX.get(aa, 20) for aa in sequence.upper()]] = 1.0
    return out


def binarised_target_counts(sequence: str, maps: torch.Tensor, threshold: float = VIG_THRESHOLD) -> torch.Tensor:
    """Vig et al.'s high-confidence edge counts of one protein, by target residue.

    Args:
        sequence: residues, length L.
        maps: [..., L, L] attention (query rows, key columns), e.g. [layers, heads, L, L].
    Returns:
        [..., 21]: ``C[..., b]`` = number of (i, j) with ``maps[..., i, j] ≥ threshold`` and residue j of type b
        (columns in ``AMINO_ACIDS`` order, column 20 = rare letters); the source residue i does not matter.
    """
    return (maps >= threshold).float().sum(-2) @ target_onehot(sequence)


@torch.no_grad()
def attention_counts(
    model: torch.nn.Module,
    sequences: Iterable[str],
    layers: Sequence[int] | None = None,
    max_len: int | None = 1024,
    block_size: int = 512,
    threshold: float = VIG_THRESHOLD,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Both amino-acid statistics of attention, summed over proteins in one pass over their maps.

    Returns ``{"weighted": [n_layers, n_heads, 20, 20]`` attention-weighted pair counts (as
    :func:`pair_counts`), ``"binarised": [n_layers, n_heads, 21]`` high-confidence edges by target residue (as
    :func:`binarised_target_counts`), ``"max_weight": [n_layers, n_heads]`` the largest attention weight seen}.
    Streams each protein's maps block by block (never a full L×L per head); proteins longer than ``max_len``
    residues are cropped to their first ``max_len`` residues; ``progress`` shows a bar over proteins.
    """
    net = as_performer(model)
    layers = list(range(len(net.layers))) if layers is None else list(layers)
    weighted = torch.zeros(len(layers), net.config.heads, 20, 20)
    binarised = torch.zeros(len(layers), net.config.heads, 21)
    max_weight = torch.zeros(len(layers), net.config.heads)
    index = {layer: i for i, layer in enumerate(layers)}
    for seq in track(sequences, desc="attention maps", unit="protein", disable=not progress, leave=False):
        seq = seq[:max_len] if max_len else seq
        onehot, target = residue_onehot(seq), target_onehot(seq)
        for blk in iter_attention_blocks(net, seq, layers, block_size=block_size):
            i = index[blk.layer]
            values = blk.values.float().cpu()  # the sums live on the CPU, whatever device the model runs on
            weighted[i, blk.heads] += onehot[blk.rows].T @ values @ onehot
            binarised[i, blk.heads] += (values >= threshold).float().sum(-2) @ target
            max_weight[i, blk.heads] = torch.maximum(max_weight[i, blk.heads], values.amax((-1, -2)))
    return {"weighted": weighted, "binarised": binarised, "max_weight": max_weight}


def pair_counts(
    model: torch.nn.Module,
    sequences: Iterable[str],
    layers: Sequence[int] | None = None,
    max_len: int | None = 1024,
    block_size: int = 512,
) -> torch.Tensor:
    """Attention-weighted pair counts summed over proteins: [n_layers, n_heads, 20, 20] (see
    :func:`attention_counts`, which also returns Vig et al.'s binarised counts from the same pass)."""
    return attention_counts(model, sequences, layers, max_len, block_size)["weighted"]


def attention_fractions(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    """Fraction of each head's attention that lands on each amino acid: [..., 20, 20] -> [..., 20].

    Normalised over the attention that lands on standard residues (rows of a head sum to 1).
    """
    to_key = np.asarray(counts, dtype=np.float64).sum(-2)  # sum over query types
    return to_key / np.clip(to_key.sum(-1, keepdims=True), 1e-30, None)


def aa_similarity(fractions: np.ndarray) -> np.ndarray:
    """Amino-acid similarity as seen by the model: [n_heads, 20] -> [20, 20] Pearson correlations.

    Entry (a, b) correlates amino acid a's and b's per-head attention fractions across the heads.
    Amino acids no head ever attends to (constant vectors) get NaN rows.
    """
    x = np.asarray(fractions, dtype=np.float64).reshape(-1, 20)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(x.T)


def substitution_matrix(name: str = "BLOSUM62") -> np.ndarray:
    """A Biopython substitution matrix (BLOSUM62, BLOSUM45, BLOSUM80, PAM250, ...) as [20, 20] in AMINO_ACIDS order."""
    m = substitution_matrices.load(name)
    return np.array([[m[a][b] for b in AMINO_ACIDS] for a in AMINO_ACIDS], dtype=np.float64)


def offdiagonal_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r between two [20, 20] matrices over their upper off-diagonal entries (190 pairs).

    Pairs where either matrix is NaN are skipped; returns NaN if fewer than 3 pairs remain.
    """
    iu = np.triu_indices(a.shape[0], k=1)
    x, y = np.asarray(a, dtype=np.float64)[iu], np.asarray(b, dtype=np.float64)[iu]
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or x[ok].std() == 0 or y[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def compare_to_matrices(counts: torch.Tensor | np.ndarray, matrices: Sequence[str] = ("BLOSUM62",)) -> dict:
    """Pearson r of the model's amino-acid similarity against substitution matrices.

    Args:
        counts: [n_layers, n_heads, 20, 20] pair counts (from :func:`pair_counts`).
        matrices: Biopython matrix names.
    Returns:
        ``{"overall": {name: r}, "per_layer": {name: [r per layer]}}``; "overall" pools all heads of all
        layers, "per_layer" uses the heads of one layer only (few heads: a noisier estimate).
    """
    frac = attention_fractions(counts)  # [layers, heads, 20]
    subs = {name: substitution_matrix(name) for name in matrices}
    overall_sim = aa_similarity(frac.reshape(-1, 20))
    return {
        "overall": {name: offdiagonal_pearson(overall_sim, s) for name, s in subs.items()},
        "per_layer": {
            name: [offdiagonal_pearson(aa_similarity(frac[i]), s) for i in range(frac.shape[0])]
            for name, s in subs.items()
        },
    }


def vig_fractions(
    binarised: torch.Tensor | np.ndarray, min_edges: int = VIG_MIN_EDGES
) -> tuple[np.ndarray, np.ndarray]:
    """Per-head fraction of high-confidence edges landing on each amino acid, for the heads that have at least
    ``min_edges`` such edges.

    Args:
        binarised: [..., 21] edge counts by target (from :func:`attention_counts` / :func:`binarised_target_counts`).
    Returns:
        (fractions [n_kept, 20], kept: bool [...] which heads survived). A head's total includes edges to rare
        letters, so its 20 fractions can sum to slightly less than 1.
    """
    counts = np.asarray(binarised, dtype=np.float64)
    total = counts.sum(-1)
    kept = total >= min_edges
    return counts[kept][:, :20] / total[kept][:, None], kept


def vig_compare(binarised: torch.Tensor | np.ndarray, matrices: Sequence[str] = ("BLOSUM62",),
                min_edges: int = VIG_MIN_EDGES) -> dict:
    """Vig et al.'s published statistic: Pearson r of the amino-acid similarity from binarised attention (heads
    with ≥ ``min_edges`` high-confidence edges only) against substitution matrices.

    Args:
        binarised: [n_layers, n_heads, 21] high-confidence edge counts by target residue.
    Returns:
        ``{"overall": {name: r}, "per_layer": {name: [r per layer]}, "n_heads", "n_heads_kept",
        "kept_per_layer": [n], "edges_per_head": [[n]], "min_edges"}``; r is NaN where fewer than 2 heads survive
        (no correlation across heads exists then).
    """
    counts = np.asarray(binarised, dtype=np.float64)
    subs = {name: substitution_matrix(name) for name in matrices}
    frac, kept = vig_fractions(counts, min_edges)

    def score(fractions: np.ndarray) -> dict[str, float]:
        if len(fractions) < 2:
            return {name: float("nan") for name in subs}
        sim = aa_similarity(fractions)
        return {name: offdiagonal_pearson(sim, s) for name, s in subs.items()}

    per_layer = [score(vig_fractions(counts[i], min_edges)[0]) for i in range(counts.shape[0])]
    return {
        "overall": score(frac),
        "per_layer": {name: [r[name] for r in per_layer] for name in subs},
        "n_heads": int(kept.size),
        "n_heads_kept": int(kept.sum()),
        "kept_per_layer": kept.sum(-1).astype(int).tolist(),
        "edges_per_head": counts.sum(-1).astype(int).tolist(),
        "min_edges": min_edges,
    }


def random_init_like(model: torch.nn.Module, seed: int = 0) -> PerformerLM:
    """A freshly initialised PerformerLM with the same configuration (the untrained null model)."""
    net = as_performer(model)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        fresh = PerformerLM(copy.deepcopy(net.config))
    return fresh.to(next(net.parameters()).device).eval()


def cluster_order(similarity: np.ndarray) -> list[int]:
    """Order of the 20 amino acids from average-linkage clustering on distance 1 − similarity."""
    sim = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=0.0)
    dist = np.clip(1.0 - (sim + sim.T) / 2, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return [int(i) for i in leaves_list(linkage(squareform(dist, checks=False), method="average"))]
