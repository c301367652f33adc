"""``pp-embed``: per-protein and per-residue embeddings of a FASTA file, like esm-extract.

    pp-embed CHECKPOINT proteins.fasta out/ --repr-layers 0 -1 --include mean per_tok --device cuda

Resumable: labels already in OUTDIR are skipped. The output files are described in
:mod:`proteinperformer.inference.embed_files`, the embeddings in :mod:`proteinperformer.inference.embed`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.checkpoints import load_model
from proteinperformer.cli.common import Parser, add_device_arguments, checked_device, run_command
from proteinperformer.inference.embed import INCLUDE, as_records, resolve_contact_head, resolve_layers
from proteinperformer.inference.embed_files import FORMATS, bundle_path, done_labels, merge_parts, predict_to_dir


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pp-embed",
        description="Extract per-sequence / per-residue representations from a proteinperformer checkpoint, an "
        "ESM-2 file or a Hugging Face ESM directory (like esm-extract). Resumable: labels already in OUTDIR are "
        "skipped.",
    )
    parser.add_argument("checkpoint", type=Path, help="a pp-train / pp-convert checkpoint, an ESM-2 .pt or HF dir")
    parser.add_argument("fasta", type=Path, help="FASTA file (.gz ok); record ids are the labels")
    parser.add_argument("outdir", type=Path, help="output directory (created)")
    parser.add_argument("--repr-layers", type=int, nargs="+", default=[-1],
                        help="layers to return: 0 = embeddings, -1 = final")
    parser.add_argument("--include", nargs="+", choices=INCLUDE, default=["mean"], help="what to save")
    parser.add_argument("--contact-head", type=Path, default=None,
                        help="for --include contacts: the contact_head.json pp-contacts wrote (default: the "
                        "model's own contact regression, e.g. an ESM-2 import)")
    parser.add_argument("--toks-per-batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--format", choices=FORMATS, default="pt", help="pt: a file per label; h5/npz: one file")
    long = parser.add_mutually_exclusive_group()
    long.add_argument("--truncate", action="store_true", help="keep the first residues of too-long sequences")
    long.add_argument("--chunk", action="store_true", help="embed too-long sequences in overlapping windows")
    add_device_arguments(parser)
    parser.add_argument("--devices", type=int, default=1,
                        help="number of processes / GPUs (>1 runs DDP; with --device cuda or cpu)")
    parser.add_argument("--attention", choices=("exact", "favor"), default=None,
                        help="swap the model's attention (weights kept): favor = FAVOR+, linear memory, no length "
                        "cap (e.g. an ESM-2 file on a 35,000-residue protein); default: as in the file")
    parser.add_argument("--num-features", type=int, default=None, help="FAVOR+ random features per head (256)")
    parser.add_argument("--kernel", choices=("softmax", "relu"), default=None,
                        help="FAVOR+ kernel when swapping (default softmax for ESM-2, else the checkpoint's)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Embed every FASTA record not yet in ``args.outdir``; returns the number of sequences embedded."""
    device = checked_device(args)
    model = load_model(args.checkpoint, attention=args.attention, num_features=args.num_features, kernel=args.kernel)
    layers = list(args.repr_layers)
    resolve_layers(layers, model.config.depth)
    contact_head = resolve_contact_head(model, args.contact_head) if "contacts" in args.include else None
    if contact_head is not None and args.chunk:
        raise ValueError("--include contacts needs the whole protein in one pass: use --truncate, not --chunk")
    records = as_records(args.fasta)
    args.outdir.mkdir(parents=True, exist_ok=True)
    done = done_labels(args.outdir, args.format)
    todo = [r for r in records if r[0] not in done]
    print(f"{len(records)} sequences in {args.fasta}; {len(done & {r[0] for r in records})} already in "
          f"{args.outdir}, {len(todo)} to embed")
    on_long = "truncate" if args.truncate else "chunk" if args.chunk else "error"
    if todo:
        is_global_zero = predict_to_dir(model, todo, args.outdir, args.format, layers, args.include, on_long,
                                        contact_head, args.precision, device, args.devices, args.toks_per_batch)
        if not is_global_zero:
            return len(todo)
    if args.format != "pt":
        n = merge_parts(args.outdir, args.format)
        print(f"{n} labels in {bundle_path(args.outdir, args.format)}")
    return len(todo)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-embed``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
