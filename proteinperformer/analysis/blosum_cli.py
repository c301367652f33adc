"""Does the model's attention know which amino acids substitute for each other? (Vig et al. 2020)

    pp-attention-blosum CHECKPOINT FASTA --n-seqs 800 --out results/
    (or: python scripts/attention_vs_blosum.py ...)

Writes ``attention_vs_blosum.json`` (Pearson r of the attention-derived amino-acid similarity against
BLOSUM62 and other matrices, overall and per layer, for the trained model and a randomly initialised model
of the same shape), ``attention_vs_blosum.png`` (model similarity next to BLOSUM62, both in a clustered
amino-acid order) and ``aa_pair_counts.npz`` (the raw attention-weighted pair counts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from proteinperformer.analysis import (  # noqa: E402
    AMINO_ACIDS,
    aa_similarity,
    attention_fractions,
    cluster_order,
    compare_to_matrices,
    load_model,
    pair_counts,
    random_init_like,
    read_sequences,
    substitution_matrix,
)

MATRICES = ("BLOSUM62", "BLOSUM45", "BLOSUM80", "PAM250")


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


@torch.no_grad()  # a context, not set_grad_enabled: callers (tests, notebooks) keep autograd
def run(
    checkpoint: str, fasta: str, n_seqs: int, out: Path, matrices: list[str] = MATRICES, max_len: int = 512,
    seed: int = 0,
) -> dict:
    """Compute pair counts for the model and its random-init null, compare, write JSON/PNG/NPZ; return the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint)
    records = read_sequences(fasta, n=n_seqs, max_len=max_len, seed=seed)
    seqs = [s for _, s in records]
    t0 = time.time()
    counts = pair_counts(model, seqs)
    t_model = time.time() - t0
    null_counts = pair_counts(random_init_like(model, seed), seqs)
    result = {
        "checkpoint": str(checkpoint),
        "fasta": str(fasta),
        "n_sequences": len(seqs),
        "n_residues": int(sum(len(s) for s in seqs)),
        "max_len": max_len,
        "layers": int(counts.shape[0]),
        "heads_per_layer": int(counts.shape[1]),
        "model": compare_to_matrices(counts, matrices),
        "null_random_init": compare_to_matrices(null_counts, matrices),
        "seconds_model": round(t_model, 1),
        "reference": "Vig et al. 2020: ProtBert-BFD 0.75, TapeBert 0.73; untrained null -0.05 to 0.21",
    }
    np.savez_compressed(out / "aa_pair_counts.npz", model=counts.numpy(), null=null_counts.numpy(),
                        amino_acids=np.array(list(AMINO_ACIDS)))
    (out / "attention_vs_blosum.json").write_text(json.dumps(result, indent=2))
    sim = aa_similarity(attention_fractions(counts).reshape(-1, 20))
    plot_similarity(sim, substitution_matrix(matrices[0]), matrices[0], result["model"]["overall"][matrices[0]],
                    out / "attention_vs_blosum.png")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint (.ckpt)")
    p.add_argument("fasta", help="proteins to aggregate attention over (FASTA, may be .gz)")
    p.add_argument("--n-seqs", type=int, default=800, help="random subset of this many sequences (default 800)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    p.add_argument("--matrices", nargs="+", default=list(MATRICES),
                   help="Biopython substitution matrices; the first is plotted (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=512, help="crop proteins to this many residues")
    p.add_argument("--seed", type=int, default=0, help="sequence subset and null-model seed")
    a = p.parse_args(argv)
    res = run(a.checkpoint, a.fasta, a.n_seqs, a.out, a.matrices, a.max_len, a.seed)
    first = a.matrices[0]
    print(f"{res['n_sequences']} sequences: r vs {first} = {res['model']['overall'][first]:.3f} "
          f"(random-init null {res['null_random_init']['overall'][first]:.3f}); written to {a.out}")


if __name__ == "__main__":
    main()
