"""``pp-generate``: sample protein sequences from a CLM checkpoint into a FASTA file.

    pp-generate CKPT samples.fasta --num-samples 20 --max-length 400 --temperature 0.8 --top-p 0.95 --prompt M

Decoding is described in :mod:`proteinperformer.inference.generate`: FAVOR+ models decode in constant time per
token, exact ones with a KV cache.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.cli.common import Parser, add_device_arguments, add_features_option, checked_device, run_command
from proteinperformer.inference.generate import load_clm, sample, write_fasta


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pp-generate", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("checkpoint", help="checkpoint of a model trained with task=clm")
    parser.add_argument("output", help="FASTA file to write")
    parser.add_argument("--num-samples", type=int, default=10, help="sequences to draw")
    parser.add_argument("--max-length", type=int, default=500, help="residues per sequence, prompt included")
    parser.add_argument("--prompt", default="", help="residues every sample starts with, e.g. M; with a vocabulary "
                        "that has tags (IgLM) they may lead: '[HEAVY][HUMAN]EVQ'")
    parser.add_argument("--no-cls", action="store_true", help="feed the prompt without a leading <cls> (GPT-2 "
                        "imports such as IgLM, whose sequences start with their tags)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    add_features_option(parser)
    return parser


def run(args: argparse.Namespace) -> Path:
    """Load the checkpoint, sample, write the FASTA; returns its path."""
    device = checked_device(args)
    model, alphabet = load_clm(args.checkpoint, device, features=args.features)
    seqs = sample(model, alphabet, args.num_samples, args.max_length, args.prompt, args.temperature,
                  args.top_k, args.top_p, args.seed, args.precision,
                  start_with_cls=not args.no_cls)
    settings = f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} seed={args.seed}"
    records = [(f"sample_{i} length={len(s)} {settings}", s) for i, s in enumerate(seqs)]
    path = write_fasta(args.output, records)
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-generate``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
