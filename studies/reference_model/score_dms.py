"""Spearman ρ on the TEM-1 β-lactamase scan (data/dms/) for a model, a randomly initialised model of the same shape,
and the two model-free baselines, beside the published numbers (Meier et al. 2021): the README's TEM-1 table.

    python studies/reference_model/score_dms.py weights/pp_mlm_relu_2.7M.ckpt

Every score comes from :func:`proteinperformer.inference.score.score_variants` (what ``pp-score`` runs), all in one
run (:func:`proteinperformer.evaluation.dms.tem1_rho`). Prints a markdown table and writes the numbers to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from proteinperformer.checkpoints import load_model
from proteinperformer.evaluation.dms import PUBLISHED, tem1_rho
from proteinperformer.files import write_json_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tem1_rho.json")
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
