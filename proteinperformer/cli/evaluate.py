"""``pp-evaluate``: a checkpoint's whole model card in one command.

    pp-evaluate weights/pp_mlm_relu_2.7M.ckpt --out studies/reference_model/results/card --device auto

What it runs and writes is described in :mod:`proteinperformer.evaluation.card`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import Parser, add_attention_arguments, add_device_arguments, run_command, summary
from proteinperformer.options import CARD_BEGIN as BEGIN
from proteinperformer.options import CARD_END as END
from proteinperformer.options import PROBES, SECTIONS


def create_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pp-evaluate", description=summary(__doc__))
    p.add_argument("checkpoint", type=Path, help="a pp-train / pp-convert checkpoint, an ESM-2 file or HF dir")
    p.add_out("output folder", required=True)
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections to leave out")
    p.add_argument("--fasta", default="data/uniprot_sample20k.fasta.gz", help="masked-residue evaluation FASTA")
    p.add_argument("--valid-frac", type=float, default=None,
                   help="accession-hash valid fraction (default: the checkpoint's training value, else 0.05)")
    p.add_argument("--test-frac", type=float, default=None,
                   help="accession-hash test fraction (default: the checkpoint's training value, else 0.05)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="accession-hash split seed (default: the checkpoint's training value, else 0)")
    p.add_argument("--crop-length", dest="max_len", type=int, default=256,
                   help="masked LM: crop sequences to this many tokens")
    p.add_argument("--batch-size", type=int, default=16, help="masked LM: sequences per batch")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="masked LM: score the first N sequences of each split (default: all; ~3 min on 2 cores)")
    for task, (train, valid, max_train) in PROBES.items():
        p.add_argument(f"--{task.replace('_', '-')}-train", dest=f"{task}_train", default=train,
                       help=f"{task} training CSV")
        p.add_argument(f"--{task.replace('_', '-')}-valid", dest=f"{task}_valid", default=valid,
                       help=f"{task} validation CSV (scored)")
        p.add_argument(f"--{task.replace('_', '-')}-max-sequences", dest=f"{task}_max_train", type=int,
                       default=max_train, help=f"{task}: sample this many training proteins, stratified by label "
                       "(default: all)")
    p.add_argument("--toks-per-batch", type=int, default=4096, help="probes: embedding batch size in tokens")
    p.add_argument("--blosum-fasta", default="data/uniprot_sample20k.fasta.gz", help="proteins for attention vs BLOSUM")
    p.add_argument("--blosum-max-sequences", dest="blosum_n_seqs", type=int, default=300,
                   help="number of proteins for attention vs BLOSUM")
    p.add_argument("--blosum-crop-length", dest="blosum_max_len", type=int, default=512,
                   help="crop proteins for attention vs BLOSUM to this many residues")
    p.add_argument("--structures", default="data/structures/pdb_chains_subset60.npz", help="chains for contacts")
    p.add_argument("--contact-train-chains", type=int, default=20, help="chains that fit the contact regression")
    p.add_argument("--contact-max-length", dest="contact_max_len", type=int, default=512,
                   help="contacts: skip (and count) chains longer than this")
    p.add_argument("--seed", type=int, default=0, help="subsets, masks and random-init nulls")
    add_device_arguments(p)
    add_attention_arguments(p)
    p.add_argument("--update-readme", type=Path, default=None,
                   help=f"replace the text between {BEGIN} and {END} in this file with the card")
    p.deprecated("--max-len", "--crop-length")
    for task in PROBES:
        p.deprecated(f"--{task.replace('_', '-')}-max-train", f"--{task.replace('_', '-')}-max-sequences")
    p.deprecated("--blosum-n-seqs", "--blosum-max-sequences")
    p.deprecated("--blosum-max-len", "--blosum-crop-length")
    p.deprecated("--contact-max-len", "--contact-max-length")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate the checkpoint and write its card."""
    from proteinperformer.evaluation.card import evaluate

    return evaluate(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-evaluate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_parser()
    parser.set_defaults(command="pp-evaluate " + shlex.join(argv))
    run_command(run, parser, argv)


if __name__ == "__main__":
    main()
