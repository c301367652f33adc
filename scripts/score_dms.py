"""Spearman ρ on the TEM-1 β-lactamase scan (data/dms/) for a model, a randomly initialised model of the same shape,
and the two model-free baselines, beside the published numbers (Meier et al. 2021): the README's TEM-1 table.

    python scripts/score_dms.py checkpoints/pp_mlm_relu_2.7M.ckpt --out results/tem1_rho.json

Every score comes from :func:`proteinperformer.inference.score.score_variants` (what ``pp-score`` runs), all in one
run. Prints a markdown table and writes the numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from proteinperformer.analysis.aminoacids import random_init_like
from proteinperformer.checkpoints import load_model
from proteinperformer.files import resolve_path, write_json_atomic
from proteinperformer.inference.score import (
    blosum_scores,
    parse_variant,
    residue_frequencies,
    score_variants,
    spearman,
    unigram_scores,
)

TEM1 = ("HPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRPEERFPMMSTFKVLLCGAVLSRVDAGQEQLGRRIHYSQNDLVEYSPVTEKHLTDGMTVRELCSAAITMS"
        "DNTAANLLLTTIGGPKELTAFLHNMGDHVTRLDRWEPELNEAIPNDERDTTMPAAMATTLRKLLTGELLTLASRQQLIDWMEADKVAGPLLRSALPAGWFIADKSGA"
        "GERGSRGIIAALGPDGKPSRIVVIYTTGSQATMDERNRQIAEIGASLIKHW")
PUBLISHED = {"ESM-1v (zero-shot, 5 models)": 0.725, "ESM-1b": 0.724, "MSA Transformer": 0.773, "DeepSequence": 0.776,
             "EVmutation": 0.718, "site-independent PSSM": 0.614, "ProtBERT-BFD": 0.507, "TAPE": 0.144,
             "UniRep": 0.032}


def tem1_rho(model, csv: str | Path = "data/dms/BLAT_ECOLX_Ranganathan2015.csv", strategies=("masked-marginals",),
             null_seed: int | None = 0, unigram_fasta: str = "data/uniprot_sample20k.fasta.gz",
             precision: str = "32") -> dict:
    """ρ against the ``2500`` column for each strategy of ``model`` (and of a random-init copy unless
    ``null_seed`` is None), BLOSUM62 and the unigram log-ratio: ``{"rho": {name: ρ}, "n": pairs, ...}``."""
    df = pd.read_csv(resolve_path(csv), encoding="utf-8-sig")
    target = pd.to_numeric(df["2500"], errors="coerce").to_numpy(dtype=np.float64)
    variants = list(df["mutant"])
    parsed = [parse_variant(v, TEM1, 24) for v in variants]
    rho, seconds = {}, {}
    models = {"model": model} | ({} if null_seed is None else {"random init": random_init_like(model, null_seed)})
    for who, m in models.items():
        for strategy in strategies:
            t = time.perf_counter()
            scores = score_variants(m, TEM1, variants, 24, strategy, precision)
            seconds[f"{who} {strategy}"] = round(time.perf_counter() - t, 1)
            rho[f"{who} {strategy}"], n = spearman(scores, target)
    rho["BLOSUM62(wt, mt)"], _ = spearman(blosum_scores(parsed), target)
    freqs = residue_frequencies(resolve_path(unigram_fasta))
    rho["unigram log f(mt)/f(wt)"], _ = spearman(unigram_scores(parsed, freqs), target)
    return {"rho": rho, "n": n, "n_rows": len(df), "target": "2500", "seconds": seconds,
            "unigram_fasta": unigram_fasta}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path("results/tem1_rho.json"))
    p.add_argument("--strategies", nargs="+", default=["wt-marginals", "masked-marginals"])
    p.add_argument("--attention", choices=("exact", "favor"), default=None)
    args = p.parse_args()
    model = load_model(args.checkpoint, attention=args.attention)
    res = tem1_rho(model, strategies=args.strategies)
    res |= {"checkpoint": str(args.checkpoint), "published": PUBLISHED}
    write_json_atomic(args.out, res)
    print(f"TEM-1 β-lactamase, {res['n']} of {res['n_rows']} substitutions with a 2500 µg/mL ampicillin fitness\n")
    print("| method | Spearman ρ |\n|---|---|")
    for name, r in res["rho"].items():
        print(f"| {Path(args.checkpoint).name} {name} | {r:.3f} |" if name.startswith(("model", "random"))
              else f"| {name} | {r:.3f} |")
    for name, r in PUBLISHED.items():
        print(f"| {name} (published) | {r:.3f} |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
