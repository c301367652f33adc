"""Does the model's attention know which amino acids substitute for each other? (Vig et al. 2020)

    pp-attention-blosum CHECKPOINT FASTA --n-seqs 800 --out results/   (proteinperformer.cli.attention_blosum)

Writes ``attention_vs_blosum.json`` (Pearson r of the attention-derived amino-acid similarity against
BLOSUM62 and other matrices, overall and per layer, for the trained model and a randomly initialised model
of the same shape), ``attention_vs_blosum.png`` (model similarity next to BLOSUM62, both in a clustered
amino-acid order) and ``aa_pair_counts.npz`` (the raw counts of both methods).

Both methods come from the same pass over the attention maps (``proteinperformer.analysis.aminoacids``):
``vig`` (default) is Vig et al.'s published method (attention binarised at weight ≥ ``--threshold`` 0.3, edges
counted by the residue attended to, heads with < ``--min-edges`` 100 edges dropped; the JSON says how many heads
survive), ``weighted`` the attention-weighted variant over all heads. ``model`` / ``null_random_init`` in the
JSON hold the ``--method`` result; ``methods`` holds both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from proteinperformer.analysis.aminoacids import (  # noqa: E402
    AMINO_ACIDS,
    VIG_MIN_EDGES,
    VIG_THRESHOLD,
    aa_similarity,
    attention_counts,
    attention_fractions,
    cluster_order,
    compare_to_matrices,
    random_init_like,
    substitution_matrix,
    vig_compare,
    vig_fractions,
)
from proteinperformer.checkpoints import load_model  # noqa: E402
from proteinperformer.data.fasta import read_sequences  # noqa: E402
from proteinperformer.model.precision import inference_autocast  # noqa: E402
from proteinperformer.options import BLOSUM_METHODS, BLOSUM_MIN_RESIDUES, MATRICES  # noqa: E402

METHODS = BLOSUM_METHODS


def plot_similarity(sim: np.ndarray, reference: np.ndarray, ref_name: str, r: float, path: Path) -> None:
    """Side-by-side heatmaps of the model's amino-acid similarity and ``reference``, clustered order."""
    order = cluster_order(sim)
    labels = [AMINO_ACIDS[i] for i in order]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, mat, title in ((axes[0], sim, f"attention similarity (r = {r:.2f})"), (axes[1], reference, ref_name)):
        im = ax.imshow(mat[np.ix_(order, order)], cmap="RdBu_r", vmin=-np.nanmax(np.abs(mat)),
                       vmax=np.nanmax(np.abs(mat)))
        ax.set_xticks(range(20), labels)
        ax.set_yticks(range(20), labels)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(x):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def compare_both(counts: dict[str, torch.Tensor], matrices: Sequence[str], min_edges: int = VIG_MIN_EDGES) -> dict:
    """Both methods' comparison with ``matrices`` from :func:`attention_counts` output."""
    return {"vig": vig_compare(counts["binarised"], matrices, min_edges),
            "weighted": compare_to_matrices(counts["weighted"], matrices)}


@torch.no_grad()  # a context, not set_grad_enabled: callers (tests, notebooks) keep autograd
def analyse(
    model: torch.nn.Module, sequences: Sequence[str], matrices: Sequence[str] = MATRICES, seed: int = 0,
    threshold: float = VIG_THRESHOLD, min_edges: int = VIG_MIN_EDGES,
) -> tuple[dict, dict, dict]:
    """Counts of the model and of its random-init null over ``sequences`` and both methods' r against
    ``matrices``; returns (model counts, null counts, ``{method: {"model": ..., "null_random_init": ...}}``)."""
    counts = attention_counts(model, sequences, threshold=threshold, progress=True)
    null_counts = attention_counts(random_init_like(model, seed), sequences, threshold=threshold, progress=True)
    trained, null = compare_both(counts, matrices, min_edges), compare_both(null_counts, matrices, min_edges)
    methods = {m: {"model": trained[m], "null_random_init": null[m]} for m in METHODS}
    for part, c in (("model", counts), ("null_random_init", null_counts)):
        methods["vig"][part]["max_attention_weight"] = float(c["max_weight"].max())
        if reason := undefined_reason(methods["vig"][part], threshold, min_edges):
            methods["vig"][part]["r_undefined"] = reason
    return counts, null_counts, methods


MIN_RESIDUES = BLOSUM_MIN_RESIDUES  # shorter proteins are skipped (and counted): too few pairs per head


def undefined_reason(part: dict, threshold: float, min_edges: int) -> str | None:
    """Why a Vig result's r is undefined (no head kept), or None when it is defined."""
    if part.get("n_heads_kept", 1) > 0:
        return None
    return (f"undefined: 0/{part['n_heads']} heads have >= {min_edges} edges with attention >= {threshold}; lower "
            "--min-edges or --threshold, add sequences (--max-sequences), or read the weighted method")


@torch.no_grad()  # a context, not set_grad_enabled: callers (tests, notebooks) keep autograd
def run(
    checkpoint: str, fasta: str, n_seqs: int, out: Path, matrices: list[str] = MATRICES, max_len: int = 512,
    seed: int = 0, method: str = "vig", threshold: float = VIG_THRESHOLD, min_edges: int = VIG_MIN_EDGES,
    precision: str = "32", device: str | torch.device = "cpu",
) -> dict:
    """Compute both methods' counts for the model and its random-init null, compare, write JSON/PNG/NPZ; return
    the JSON (``model`` / ``null_random_init`` = the ``method`` result, ``methods`` = both)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint, device)
    short: list[str] = []
    records = read_sequences(fasta, n=n_seqs, min_len=MIN_RESIDUES, max_len=max_len, seed=seed, too_short=short)
    if not records:
        raise ValueError(f"{fasta}: no sequence has {MIN_RESIDUES} residues or more ({len(short)} shorter, e.g. "
                         f"{', '.join(short[:3]) or 'none'}); the attention statistics need longer proteins")
    seqs = [s for _, s in records]
    t0 = time.time()
    with inference_autocast(precision, device):  # the forward passes that produce q and k
        counts, null_counts, methods = analyse(model, seqs, matrices, seed, threshold, min_edges)
    result = {
        "checkpoint": str(checkpoint),
        "fasta": str(fasta),
        "n_sequences": len(seqs),
        "n_skipped_short": len(short),  # fewer than MIN_RESIDUES residues: not used
        "skipped_short_ids": short[:20],
        "n_residues": int(sum(len(s) for s in seqs)),
        "max_len": max_len,
        "layers": int(counts["weighted"].shape[0]),
        "heads_per_layer": int(counts["weighted"].shape[1]),
        "method": method,
        "precision": precision,
        "vig_threshold": threshold,
        "vig_min_edges": min_edges,
        "model": methods[method]["model"],
        "null_random_init": methods[method]["null_random_init"],
        "methods": methods,
        "seconds": round(time.time() - t0, 1),
        "reference": "Vig et al. 2020 (binarised method): ProtBert-BFD 0.75, TapeBert 0.73; untrained -0.05 to 0.21",
    }
    np.savez_compressed(out / "aa_pair_counts.npz", model=counts["weighted"].numpy(),
                        null=null_counts["weighted"].numpy(), model_binarised=counts["binarised"].numpy(),
                        null_binarised=null_counts["binarised"].numpy(), amino_acids=np.array(list(AMINO_ACIDS)))
    (out / "attention_vs_blosum.json").write_text(json.dumps(_json_safe(result), indent=2))
    if method == "vig" and result["model"]["n_heads_kept"] >= 2:
        sim = aa_similarity(vig_fractions(counts["binarised"], min_edges)[0])
    else:
        sim = aa_similarity(attention_fractions(counts["weighted"]).reshape(-1, 20))
    plot_similarity(sim, substitution_matrix(matrices[0]), matrices[0], result["model"]["overall"][matrices[0]],
                    out / "attention_vs_blosum.png")
    return result
