"""``pp-attention-blosum``: does the model's attention know which amino acids substitute for each other?

    pp-attention-blosum CHECKPOINT FASTA --n-seqs 800 --out results/

What it computes and writes is described in :mod:`proteinperformer.analysis.blosum_report` (Vig et al. 2020).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import Parser, add_device_arguments, checked_device, run_command
from proteinperformer.options import BLOSUM_METHODS as METHODS
from proteinperformer.options import MATRICES, VIG_MIN_EDGES, VIG_THRESHOLD


def create_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pp-attention-blosum", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("checkpoint", help="a pp-train / pp-convert checkpoint, an ESM-2 file or a Hugging Face ESM dir")
    p.add_argument("fasta", help="proteins to aggregate attention over (FASTA, may be .gz)")
    p.add_argument("--n-seqs", type=int, default=800, help="random subset of this many sequences")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    p.add_argument("--matrices", nargs="+", default=list(MATRICES),
                   help="Biopython substitution matrices; the first is plotted")
    p.add_argument("--max-len", type=int, default=512, help="crop proteins to this many residues")
    p.add_argument("--seed", type=int, default=0, help="sequence subset and null-model seed")
    p.add_argument("--method", choices=METHODS, default="vig",
                   help="vig: Vig et al.'s binarised method; weighted: attention-weighted fractions")
    p.add_argument("--threshold", type=float, default=VIG_THRESHOLD, help="vig: attention weight of an edge")
    p.add_argument("--min-edges", type=int, default=VIG_MIN_EDGES, help="vig: drop heads with fewer edges")
    add_device_arguments(p)
    return p


def report(a: argparse.Namespace) -> dict:
    """Run the analysis and print r against the first matrix for both methods; returns the JSON."""
    from proteinperformer.analysis.blosum_report import run

    device = checked_device(a)
    res = run(a.checkpoint, a.fasta, a.n_seqs, a.out, a.matrices, a.max_len, a.seed, a.method, a.threshold,
              a.min_edges, a.precision, device)
    first = a.matrices[0]
    print(f"{res['n_sequences']} sequences, r vs {first}:")
    for m, r in res["methods"].items():
        kept = (f" ({r['model']['n_heads_kept']}/{r['model']['n_heads']} heads with >= {a.min_edges} edges >= "
                f"{a.threshold}; null {r['null_random_init']['n_heads_kept']})" if m == "vig" else " (all heads)")
        print(f"  {m:9s} model {r['model']['overall'][first]:.3f}, random-init null "
              f"{r['null_random_init']['overall'][first]:.3f}{kept}")
    print(f"written to {a.out}")
    return res


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-attention-blosum``."""
    run_command(report, create_parser(), argv)


if __name__ == "__main__":
    main()
