"""``pp-contacts``: can the model's attention find which residues touch in the folded protein?

    pp-contacts CHECKPOINT --structures data/structures/pdb_chains_subset60.npz --train-chains 20 --out contacts/

What it fits and writes is described in :mod:`proteinperformer.analysis.contacts_report` (ESM-style contacts).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import Parser, add_device_arguments, checked_device, run_command, summary


def create_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pp-contacts", description=summary(__doc__))
    p.add_argument("checkpoint", help="a pp-train / pp-convert checkpoint, an ESM-2 file or a Hugging Face ESM dir")
    p.add_argument("--structures", default="data/structures/pdb_chains_subset60.npz",
                   help="chains in the pdb_chains.npz layout")
    p.add_argument("--train-chains", type=int, default=20, help="chains used to fit the regression (ESM: 20)")
    p.add_out("output folder", default=Path("contacts"))
    p.add_argument("--atom", choices=("cb", "ca"), default="cb", help="distance between Cβ or Cα atoms")
    p.add_argument("--max-length", type=int, default=512, help="skip (and count) chains longer than this")
    p.add_argument("--seed", type=int, default=0, help="null-model seed")
    p.add_argument("--max-sequences", type=int, default=None, help="use only the first N chains (default: all)")
    add_device_arguments(p)
    p.deprecated("--n-chains", "--max-sequences")
    p.deprecated("--max-len", "--max-length")
    return p


def report(a: argparse.Namespace) -> dict:
    """Fit and score the contact regression; print long-range P@L against the null; returns the JSON."""
    from proteinperformer.analysis.contacts_report import run

    device = checked_device(a)
    res = run(a.checkpoint, a.structures, a.train_chains, a.out, a.atom, a.max_length, a.seed, a.max_sequences,
              a.precision, device)
    m, n = res["model"]["mean"]["long"], res["null_random_init"]["mean"]["long"]
    print(f"{res['n_test']} test chains, long-range P@L = {m['L']:.3f} (random-init null {n['L']:.3f}, "
          f"background {m['background']:.3f}); written to {a.out}")
    if skipped := res["n_skipped_long"]:
        print(f"{skipped} chains longer than --max-length {a.max_length} skipped: "
              f"{', '.join(res['skipped_long_ids'][:5])}{', ...' if skipped > 5 else ''}")
    return res


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-contacts``."""
    run_command(report, create_parser(), argv)


if __name__ == "__main__":
    main()
