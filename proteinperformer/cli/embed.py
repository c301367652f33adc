"""``pp-embed``: per-protein and per-residue embeddings of a FASTA file, like esm-extract.

    pp-embed CHECKPOINT proteins.fasta --out emb/ --repr-layers 0 -1 --include mean per_tok --device cuda

Resumable: labels already in ``--out`` are skipped. ``--format h5`` streams any number of proteins to per-rank
shards linked into one ``embeddings.h5``; ``npz`` is for small jobs (merged in memory). The FASTA is read once
up front (letters, duplicate labels, too-long sequences: the run stops before any embedding, listing their ids),
then streamed. The output files are described in :mod:`proteinperformer.inference.embed_files`, the embeddings
in :mod:`proteinperformer.inference.embed`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import (
    Parser,
    add_attention_arguments,
    add_device_arguments,
    checked_device,
    run_command,
)
from proteinperformer.options import DTYPES, FORMATS, INCLUDE, LABELS


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pp-embed",
        description="Extract per-sequence / per-residue representations from a proteinperformer checkpoint, an "
        "ESM-2 file or a Hugging Face ESM directory (like esm-extract). Resumable: labels already in --out are "
        "skipped.",
    )
    parser.add_argument("checkpoint", type=Path, help="a pp-train / pp-convert checkpoint, an ESM-2 .pt or HF dir")
    parser.add_argument("fasta", type=Path, help="FASTA file (.gz ok), streamed")
    parser.add_out("output folder (created)", required=True, positional=True)
    parser.add_argument("--repr-layers", type=int, nargs="+", default=[-1],
                        help="layers to return: 0 = embeddings, -1 = final (files key them 0..depth)")
    parser.add_argument("--include", nargs="+", choices=INCLUDE, default=["mean"], help="what to save")
    parser.add_argument("--contact-head", type=Path, default=None,
                        help="for --include contacts: the contact_head.json pp-contacts wrote (default: the "
                        "model's own contact regression, e.g. an ESM-2 import)")
    parser.add_argument("--toks-per-batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--format", choices=FORMATS, default="pt",
                        help="pt: a file per label (esm-extract); h5: streamed per-rank shards linked into one "
                        "embeddings.h5, any size; npz: one file merged in memory, small jobs only")
    parser.add_argument("--label", choices=LABELS, default="accession",
                        help="accession: the UniProt accession or first word of the header; header: the whole "
                        "header line (as esm-extract names its files)")
    parser.add_argument("--block-size", type=int, default=100_000,
                        help="sequences read, length-sorted and batched at a time (bounds memory: one block per rank)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored array type (float16: half size)")
    long = parser.add_mutually_exclusive_group()
    long.add_argument("--truncate", action="store_true", help="keep the first residues of too-long sequences")
    long.add_argument("--chunk", action="store_true", help="embed too-long sequences in overlapping windows")
    add_device_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="show Lightning's banners (GPU/TPU available), tips and third-party deprecation warnings")
    parser.add_argument("--devices", type=int, default=1,
                        help="number of processes / GPUs (>1 runs DDP; with --device cuda or cpu)")
    add_attention_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="when --out holds embeddings made with other --include / --repr-layers / --format / "
                        "--dtype: remove them and embed every protein again (default: stop)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Embed every FASTA record not yet in ``args.out``; returns the number of sequences embedded."""
    from proteinperformer.checkpoints import load_model
    from proteinperformer.inference.embed import residue_limit, resolve_contact_head, resolve_layers
    from proteinperformer.inference.embed_files import (
        bundle_path,
        done_labels,
        merge_parts,
        predict_to_dir,
        prepare_folder,
        scan_fasta,
        settings_of,
    )
    device = checked_device(args)
    model = load_model(args.checkpoint, attention=args.attention, num_features=args.num_features, kernel=args.kernel,
                       features=args.features)
    layers = list(args.repr_layers)
    resolve_layers(layers, model.config.depth)
    contact_head = resolve_contact_head(model, args.contact_head) if "contacts" in args.include else None
    if contact_head is not None and args.chunk:
        raise ValueError("--include contacts needs the whole protein in one pass: use --truncate, not --chunk")
    on_long = "truncate" if args.truncate else "chunk" if args.chunk else "error"
    prepare_folder(args.out, settings_of(args.format, args.include, layers, model.config.depth, args.dtype),
                   args.overwrite)
    done = done_labels(args.out, args.format)
    limit = residue_limit(model.config) if on_long == "error" else None
    scan = scan_fasta(args.fasta, args.label, limit, done, model.alphabet)  # fails before any embedding
    print(f"{scan['n']:,} sequences in {args.fasta}; {scan['n'] - scan['todo']:,} already in {args.out}, "
          f"{scan['todo']:,} to embed ({scan['residues']:,} residues)")
    if scan["todo"]:
        is_global_zero = predict_to_dir(model, args.fasta, args.out, args.format, layers, args.include, on_long,
                                        contact_head, args.precision, device, args.devices, args.toks_per_batch,
                                        args.label, done, args.dtype, args.block_size, total=scan["todo"],
                                        verbose=args.verbose)
        if not is_global_zero:
            return scan["todo"]
    if args.format != "pt":
        n = merge_parts(args.out, args.format)
        print(f"{n:,} labels in {bundle_path(args.out, args.format)}")
    return scan["todo"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-embed``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
