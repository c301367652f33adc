"""``pp-attention-blosum``: does the model's attention know which amino acids substitute for each other?

    pp-attention-blosum CHECKPOINT FASTA --max-sequences 800 --out blosum/

What it computes and writes is described in :mod:`proteinperformer.analysis.blosum_report` (Vig et al. 2020).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import Parser, add_device_arguments, checked_device, run_command, summary
from proteinperformer.options import BLOSUM_METHODS as METHODS
from proteinperformer.options import BLOSUM_MIN_RESIDUES as MIN_RESIDUES
from proteinperformer.options import MATRICES, VIG_MIN_EDGES, VIG_THRESHOLD


def create_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pp-attention-blosum", description=summary(__doc__))
    p.add_argument("checkpoint", help="a pp-train / pp-convert checkpoint, an ESM-2 file or a Hugging Face ESM dir")
    p.add_argument("fasta", help="proteins to aggregate attention over (FASTA, may be .gz)")
    p.add_argument("--max-sequences", type=int, default=800, help="a random subset of this many sequences")
    p.add_out("output folder", default=Path("blosum"))
    p.add_argument("--matrices", nargs="+", default=list(MATRICES),
                   help="Biopython substitution matrices; the first is plotted")
    p.add_argument("--crop-length", type=int, default=512, help="crop proteins to this many residues")
    p.add_argument("--seed", type=int, default=0, help="sequence subset and null-model seed")
    p.add_argument("--method", choices=METHODS, default="vig",
                   help="vig: Vig et al.'s binarised method; weighted: attention-weighted fractions")
    p.add_argument("--threshold", type=float, default=VIG_THRESHOLD, help="vig: attention weight of an edge")
    p.add_argument("--min-edges", type=int, default=VIG_MIN_EDGES, help="vig: drop heads with fewer edges")
    add_device_arguments(p)
    p.deprecated("--n-seqs", "--max-sequences")
    p.deprecated("--max-len", "--crop-length")
    return p


def report(a: argparse.Namespace) -> dict:
    """Run the analysis and print r against the first matrix for both methods; returns the JSON."""
    from proteinperformer.analysis.blosum_report import run

    device = checked_device(a)
    res = run(a.checkpoint, a.fasta, a.max_sequences, a.out, a.matrices, a.crop_length, a.seed, a.method, a.threshold,
              a.min_edges, a.precision, device)
    first = a.matrices[0]
    skipped = res["n_skipped_short"]
    print(f"{res['n_sequences']} sequences, r vs {first}:" + (
        f" ({skipped} shorter than {MIN_RESIDUES} residues skipped: {', '.join(res['skipped_short_ids'][:5])}"
        f"{', ...' if skipped > 5 else ''})" if skipped else ""))
    for m, r in res["methods"].items():
        kept = (f" ({r['model']['n_heads_kept']}/{r['model']['n_heads']} heads with >= {a.min_edges} edges >= "
                f"{a.threshold}; null {r['null_random_init']['n_heads_kept']})" if m == "vig" else " (all heads)")
        model_r = r["model"].get("r_undefined") or f"{r['model']['overall'][first]:.3f}"
        null_r = "undefined" if "r_undefined" in r["null_random_init"] else \
            f"{r['null_random_init']['overall'][first]:.3f}"
        print(f"  {m:9s} model {model_r}, random-init null {null_r}{kept}")
    print(f"written to {a.out}")
    return res


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-attention-blosum``."""
    run_command(report, create_parser(), argv)


if __name__ == "__main__":
    main()
