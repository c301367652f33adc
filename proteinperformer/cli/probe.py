"""``pp-probe``: linear probes on a checkpoint's embeddings against sequence-only baselines.

    pp-probe CKPT --train data/probes/ss3/train.csv --valid data/probes/ss3/valid.csv --out results/ss3.json

Tasks, features, baselines and metrics are described in :mod:`proteinperformer.evaluation.probe`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import (
    Parser,
    add_attention_arguments,
    add_device_arguments,
    check_output_file,
    checked_device,
    run_command,
)


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pp-probe",
        description="Linear probes on a checkpoint's embeddings against sequence-only baselines: ss3 (per residue), "
        "location and fold_class (per protein), go_mf (GO terms, CAFA F-max). The task is inferred from the CSV "
        "columns.",
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by pp-train, pp-convert, or an ESM-2 file")
    parser.add_argument("--train", type=Path, required=True, help="training CSV")
    parser.add_argument("--valid", type=Path, required=True, help="validation CSV (the test set if no --test)")
    parser.add_argument("--test", type=Path, default=None, help="test CSV (default: the validation CSV)")
    parser.add_out("results JSON (PNG beside it)", default=Path("probe.json"))
    parser.add_argument("--max-sequences", type=int, default=None,
                        help="sample this many training proteins, stratified by label (valid and test: all)")
    parser.add_argument("--repr-layers", type=int, default=-1, metavar="LAYER",
                        help="the one representation layer to probe (0 = embeddings, -1 = final)")
    parser.add_argument("--C", type=float, nargs="+", default=[1.0], help="inverse regularisation (several: "
                        "chosen on --valid; needs --test)")
    parser.add_argument("--seed", type=int, default=0, help="training-subset and classifier seed")
    parser.add_argument("--toks-per-batch", type=int, default=4096, help="embedding batch size in tokens")
    add_device_arguments(parser)
    add_attention_arguments(parser)
    parser.deprecated("--max-train", "--max-sequences")
    parser.deprecated("--layer", "--repr-layers")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Check the tables, load the checkpoint, run :func:`probe_files`; writes ``args.out`` and its PNG."""
    from proteinperformer.checkpoints import load_model
    from proteinperformer.evaluation.probe import probe_files, read_tables

    device = checked_device(args)
    check_output_file(args.out, "probe.json")
    read_tables(args.train, args.valid, args.test, args.max_sequences, args.seed)  # bad data fails before the model
    model = load_model(args.checkpoint, device, attention=args.attention, num_features=args.num_features,
                       kernel=args.kernel, features=args.features)
    report = probe_files(model, args.train, args.valid, args.out, args.test, args.max_sequences, args.repr_layers,
                         args.C, args.seed, args.toks_per_batch, args.precision, checkpoint=str(args.checkpoint))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-probe``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
