"""``pp-score``: zero-shot variant-effect scores of a deep mutational scan, like ESM-1v's ``predict.py``.

    pp-score MODEL dms.csv --out scored.csv --sequence HPETLVKV... --mutation-col mutant --offset-idx 24 \\
        --scoring-strategy masked-marginals --target-col 2500

Writes the input CSV back (every row and column, as read) with the score column added (``--score-col``, default
the strategy's name) and two baseline columns that need no model, ``blosum62`` and ``unigram``, so a ρ can be
read against them. With ``--target-col`` it prints the Spearman ρ of each column against the target and writes
them to a JSON beside the output (``--rho-json``). Scores: :mod:`proteinperformer.inference.score`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proteinperformer.cli.common import (
    Parser,
    add_attention_arguments,
    add_device_arguments,
    check_output_file,
    checked_device,
    run_command,
)
from proteinperformer.files import read_csv, resolve_path, write_atomic, write_json_atomic
from proteinperformer.options import STRATEGIES

if TYPE_CHECKING:
    import pandas as pd

BASELINE_COLUMNS = ("blosum62", "unigram")


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pp-score",
        description="Score every substitution of a deep mutational scan with a masked LM (ESM-1v's predict.py "
        "strategies), beside the BLOSUM62 and unigram baselines; Spearman rho against a measured column.",
    )
    parser.add_argument("model", type=Path, help="a pp-train / pp-convert checkpoint, an ESM-2 .pt or HF dir")
    parser.add_argument("dms_csv", type=Path, help="CSV with one variant per row")
    parser.add_out("the input CSV with the score columns added (written atomically)", required=True, positional=True)
    seq = parser.add_mutually_exclusive_group(required=True)
    seq.add_argument("--sequence", help="the wild-type sequence")
    seq.add_argument("--fasta", type=Path, help="FASTA with the wild-type sequence (one record)")
    parser.add_argument("--mutation-col", default="mutant", help="column of mutations like H24C or H24C:A25G")
    parser.add_argument("--offset-idx", type=int, default=1, help="position number of the sequence's first residue")
    parser.add_argument("--scoring-strategy", choices=STRATEGIES, default="masked-marginals",
                        help="wt-marginals: one pass; masked-marginals: each mutated position masked; pseudo-ll: "
                        "pseudo-log-likelihood of each whole mutant (L passes per mutant)")
    parser.add_argument("--score-col", default=None, help="name of the score column (default: the strategy's name)")
    parser.add_argument("--target-col", default=None, help="measured fitness column: print and save Spearman rho")
    parser.add_argument("--rho-json", type=Path, default=None, help="where to write rho (default: OUT.rho.json)")
    parser.add_argument("--skip-mismatched", action="store_true",
                        help="count and skip (empty score) rows whose wild type does not match the sequence, "
                        "instead of stopping")
    parser.add_argument("--no-baselines", action="store_true", help="do not add the blosum62 / unigram columns")
    parser.add_argument("--unigram-fasta", default="data/uniprot_sample20k.fasta.gz",
                        help="the unigram baseline's residue frequencies are counted over every sequence of this file "
                        "(25 residue letters, add-one smoothed)")
    parser.add_argument("--toks-per-batch", type=int, default=4096, help="tokens per forward pass")
    add_device_arguments(parser)
    add_attention_arguments(parser)
    return parser


def wild_type(args: argparse.Namespace) -> str:
    """The wild-type sequence of ``--sequence`` or of the one record of ``--fasta``."""
    from proteinperformer.data.fasta import read_fasta

    if args.sequence is not None:
        return args.sequence.strip().upper().removesuffix("*")
    records = list(read_fasta(args.fasta))
    if len(records) != 1:
        raise ValueError(f"{args.fasta}: holds {len(records)} records; give a FASTA with the one wild-type sequence")
    return records[0].sequence.upper().removesuffix("*")


def read_variants(args: argparse.Namespace, sequence: str) -> tuple[pd.DataFrame, list, int]:
    """(the CSV as strings, each row's parsed substitutions or None when skipped, number skipped); a bad row
    raises naming the file and line."""
    from proteinperformer.inference.score import VariantError, parse_variant

    df = read_csv(args.dms_csv, "CSV of variants", dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = ["" if str(c).startswith("Unnamed: ") else c for c in df.columns]  # keep an unnamed index header
    if args.mutation_col not in df.columns:
        raise ValueError(f"{args.dms_csv}: no column {args.mutation_col!r} (columns: {list(df.columns)[:12]}); "
                         "set --mutation-col")
    if args.target_col is not None and args.target_col not in df.columns:
        raise ValueError(f"{args.dms_csv}: no column {args.target_col!r} for --target-col")
    parsed, skipped = [], 0
    for i, text in enumerate(df[args.mutation_col]):
        where = f"{args.dms_csv}:{i + 2}: {args.mutation_col} {text!r}"  # line 1 is the header
        try:
            parsed.append(parse_variant(text, sequence, args.offset_idx, where))
        except VariantError as err:
            if not (args.skip_mismatched and "says wild type" in str(err)):
                raise
            parsed.append(None)
            skipped += 1
    return df, parsed, skipped


def run(args: argparse.Namespace) -> dict:
    """Score the CSV; returns the ρ record (empty without ``--target-col``)."""
    import numpy as np
    import pandas as pd

    from proteinperformer.checkpoints import load_model
    from proteinperformer.data.unigram import fasta_unigram_frequencies, unigram_description
    from proteinperformer.inference.score import blosum_scores, score_variants, spearman, unigram_scores
    from proteinperformer.tokenizer import Alphabet

    device = checked_device(args)
    check_output_file(args.out)  # before hours of scoring
    sequence = wild_type(args)
    df, parsed, skipped = read_variants(args, sequence)  # bad rows fail before the model is loaded
    score_col = args.score_col or args.scoring_strategy
    unigram_alphabet = Alphabet()  # the unigram baseline's letters (model-free: not the model's vocabulary)
    freqs = None if args.no_baselines else fasta_unigram_frequencies(resolve_path(args.unigram_fasta),
                                                                     unigram_alphabet)
    model = load_model(args.model, device, attention=args.attention, num_features=args.num_features,
                       kernel=args.kernel, features=args.features)
    variants = [None if s is None else ":".join(f"{wt}{idx + 1}{mt}" for idx, wt, mt in s) for s in parsed]
    scores = score_variants(model, sequence, variants, 1, args.scoring_strategy, args.precision,
                            args.toks_per_batch, progress=True)
    columns = {score_col: scores}
    if freqs is not None:
        columns |= {"blosum62": blosum_scores(parsed), "unigram": unigram_scores(parsed, freqs)}
    for name, values in columns.items():
        df[name] = [f"{v:.6g}" if np.isfinite(v) else "" for v in values]
    write_atomic(args.out, lambda tmp: df.to_csv(tmp, index=False))
    print(f"{len(df)} rows, {len(df) - skipped} scored ({args.scoring_strategy}) -> {args.out}"
          + (f"; {skipped} rows skipped: wild type does not match the sequence" if skipped else ""))
    if args.target_col is None:
        return {}
    target = pd.to_numeric(df[args.target_col].replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64)
    rho = {}
    for name, values in columns.items():
        rho[name], n = spearman(values, target)
        print(f"Spearman rho {name} vs {args.target_col}: {rho[name]:.4f} (n = {n})")
    record = {"model": str(args.model), "dms_csv": str(args.dms_csv), "strategy": args.scoring_strategy,
              "target_col": args.target_col, "offset_idx": args.offset_idx, "attention": model.config.attention,
              "precision": args.precision, "n_rows": len(df), "n_skipped_mismatched": skipped,
              "n_with_target": int(np.isfinite(target).sum()), "spearman": rho}
    if freqs is not None:
        record["unigram"] = unigram_description(unigram_alphabet, f"whole-file ({args.unigram_fasta})")
    path = args.rho_json or args.out.with_name(args.out.name + ".rho.json")
    record["spearman"] = {k: v if np.isfinite(v) else None for k, v in rho.items()}  # JSON has no NaN
    write_json_atomic(path, record)
    print(f"written: {path}")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-score``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
