"""``pp-generate``: sample protein sequences from a CLM checkpoint into a FASTA file.

    pp-generate CKPT --out samples.fasta --num-samples 20 --max-length 400 --temperature 0.8 --top-p 0.95 --prompt M

Decoding is described in :mod:`proteinperformer.inference.generate`: FAVOR+ models decode in constant time per
token, exact ones with a KV cache.
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
    summary,
)


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pp-generate", description=summary(__doc__))
    parser.add_argument("checkpoint", help="checkpoint of a model trained with task=clm")
    parser.add_out("FASTA file to write", required=True, positional=True)
    parser.add_argument("--num-samples", type=int, default=10, help="sequences to draw (to write, not a subset)")
    parser.add_argument("--max-length", type=int, default=500,
                        help="stop each sequence at this many residues, prompt included")
    parser.add_argument("--prompt", default="", help="residues every sample starts with, e.g. M; with a vocabulary "
                        "that has tags (IgLM) they may lead: '[HEAVY][HUMAN]EVQ'")
    parser.add_argument("--no-cls", action="store_true", help="feed the prompt without a leading <cls> (GPT-2 "
                        "imports such as IgLM, whose sequences start with their tags)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divide the logits by this before sampling (< 1: more conservative)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device_arguments(parser)
    add_attention_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> Path:
    """Load the checkpoint, sample, write the FASTA; returns its path."""
    from proteinperformer.inference.generate import load_clm, sample, write_fasta
    from proteinperformer.model import convert_attention

    device = checked_device(args)
    check_output_file(args.out, "samples.fasta")
    model, alphabet = load_clm(args.checkpoint, device, features=args.features)
    if args.attention or args.num_features or args.kernel:
        model = convert_attention(model, args.attention, args.num_features, args.kernel, seed=args.seed,
                                  features=args.features).eval()
    seqs = sample(model, alphabet, args.num_samples, args.max_length, args.prompt, args.temperature,
                  args.top_k, args.top_p, args.seed, args.precision,
                  start_with_cls=not args.no_cls)
    settings = f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} seed={args.seed}"
    records = [(f"sample_{i} length={len(s)} {settings}", s) for i, s in enumerate(seqs)]
    path = write_fasta(args.out, records)
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-generate``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
