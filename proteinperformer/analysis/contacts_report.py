"""Can the model's attention find which residues touch in the folded protein? (ESM-style contacts)

    pp-contacts CHECKPOINT --structures data/structures/pdb_chains_subset60.npz --train-chains 20 --out results/

Fits a logistic regression on the APC-corrected symmetrised attention of every layer and head using the
first ``--train-chains`` chains, evaluates on the rest and writes ``contacts.json`` (mean precision of the
top L, L/2, L/5 medium- and long-range predictions, the background rate, per-chain values, the same for a
randomly initialised model of the same shape), ``contacts.png`` (predicted vs true map of one test chain) and
``contact_head.json`` (the fitted regression, for ``pp-embed --include contacts --contact-head``).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from proteinperformer.analysis.aminoacids import random_init_like  # noqa: E402
from proteinperformer.analysis.contacts import evaluate_contacts, load_structures  # noqa: E402
from proteinperformer.checkpoints import load_model  # noqa: E402
from proteinperformer.model.precision import inference_autocast  # noqa: E402


def plot_contacts(example: dict, path: Path | None = None, min_sep: int = 6) -> plt.Figure:
    """Predicted vs true contact map of one chain (``example`` from ``evaluate_contacts``).

    Left: predicted probabilities (upper triangle) over true contacts (lower). Right: the top-L predictions
    (|i−j| ≥ min_sep; blue correct, red wrong) above the diagonal, true contacts below. Saved to ``path``
    (and closed) when given; the figure is returned.
    """
    pred, true = example["predicted"], example["true"]
    L = true.shape[0]
    sep = np.abs(np.arange(L)[None] - np.arange(L)[:, None])
    scores = np.where(np.triu(sep >= min_sep), pred, -np.inf)
    top = np.zeros_like(true)
    top.flat[np.argsort(-scores, axis=None)[:L]] = True
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    axes[0].imshow(np.where(np.triu(np.ones((L, L), bool)), pred, np.nan), cmap="Blues")
    axes[0].imshow(np.where(np.tril(sep >= min_sep), true, np.nan), cmap="Greys", alpha=0.6)
    axes[0].set_title(f"{example['id']}: predicted probability (upper) / true contacts (lower)")
    ii, jj = np.nonzero(np.tril(true & (sep >= min_sep)))
    axes[1].scatter(jj, ii, s=4, c="lightgrey", label="true contact")
    pi, pj = np.nonzero(top)
    hit = true[pi, pj]
    axes[1].scatter(pj[hit], pi[hit], s=8, c="tab:blue", label="top-L predicted, correct")
    axes[1].scatter(pj[~hit], pi[~hit], s=8, c="tab:red", label="top-L predicted, wrong")
    axes[1].set_xlim(0, L)
    axes[1].set_ylim(L, 0)
    axes[1].set_aspect("equal")
    axes[1].legend(loc="lower left", fontsize=7)
    axes[1].set_title("top-L predictions (upper) vs true (lower)")
    for ax in axes:
        ax.set_xlabel("residue")
        ax.set_ylabel("residue")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def _summary(res: dict) -> dict:
    return {"mean": res["mean"], "per_chain": res["per_chain"], "coef": np.round(res["coef"], 4).tolist()}


@torch.no_grad()  # a context, not set_grad_enabled: callers (tests, notebooks) keep autograd
def run(
    checkpoint: str, structures: str, n_train: int, out: Path, atom: str = "cb", max_len: int = 512, seed: int = 0,
    n_chains: int | None = None, precision: str = "32", device: str | torch.device = "cpu",
) -> dict:
    """Evaluate contact prediction for the checkpoint and its random-init null; write JSON and PNG."""
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint, device)
    chains = load_structures(structures)[:n_chains]
    too_long = [c.id for c in chains if max_len is not None and len(c.sequence) > max_len]  # skipped, counted
    with inference_autocast(precision, device):
        res = evaluate_contacts(model, chains, n_train=n_train, atom=atom, max_len=max_len, progress=True)
        null = evaluate_contacts(random_init_like(model, seed), chains, n_train=n_train, atom=atom, max_len=max_len,
                                 progress=True)
    result = {
        "checkpoint": str(checkpoint),
        "structures": str(structures),
        "contact_definition": f"{atom.upper()} < 8 Å",
        "precision": precision,
        "n_train": res["n_train"],
        "n_test": res["n_test"],
        "max_len": max_len,
        "n_skipped_long": len(too_long),
        "skipped_long_ids": too_long[:20],
        "model": _summary(res),
        "null_random_init": _summary(null),
    }
    res["head"].source = f"pp-contacts {checkpoint} on {structures} ({res['n_train']} chains)"
    result["contact_head"] = str(res["head"].save(out / "contact_head.json"))
    (out / "contacts.json").write_text(json.dumps(result, indent=2))
    plot_contacts(res["example"], out / "contacts.png")
    return result
