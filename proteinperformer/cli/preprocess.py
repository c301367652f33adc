"""``pp-preprocess``: stream FASTA files (plain or .gz) into a sharded token store for training.

    pp-preprocess uniref50.fasta.gz --out stores/uniref50 --workers 8
    pp-preprocess --verify stores/uniref50     # recompute every checksum (exit 1 naming each damaged file)

The pipeline, the store layout and resuming are described in :mod:`proteinperformer.data.store.preprocess`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from proteinperformer.cli.common import Parser, run_command, summary


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pp-preprocess", description=summary(__doc__))
    parser.add_argument("inputs", nargs="*", help="FASTA files (.fasta / .fasta.gz)")
    parser.add_out("output store directory (required unless --verify)")
    parser.add_argument("--verify", metavar="STORE", default=None,
                        help="check a finished store: recompute every checksum, name each damaged or missing file")
    parser.add_argument("--workers", type=int, default=1, help="parse processes (1 = in this process)")
    parser.add_argument("--chunk-mb", type=float, default=32, help="FASTA megabytes per shard")
    parser.add_argument("--on-invalid", choices=("error", "skip"), default="error",
                        help="records with invalid characters, no sequence or no id: fail, or skip and count")
    parser.add_argument("--on-duplicate-id", choices=("error", "skip"), default="error",
                        help="repeated accessions: fail, or keep the first and count the rest")
    parser.add_argument("--min-length", type=int, default=None, help="skip (and count) shorter sequences")
    parser.add_argument("--max-length", type=int, default=None, help="skip (and count) longer sequences")
    parser.add_argument("--dedup", action="store_true", help="remove exact duplicate sequences (first kept)")
    parser.add_argument("--holdout", default=None, help="file of accessions (one per line) for the 'ood' split")
    parser.add_argument("--clusters", default=None,
                        help="TSV of representative TAB member (mmseqs createtsv; UniRef50 -> UniRef90 tables): whole "
                             "clusters go to one split, and data.sampling=cluster can draw one member per cluster")
    parser.add_argument("--valid-frac", type=float, default=0.05, help="fraction of sequences in the valid split")
    parser.add_argument("--test-frac", type=float, default=0.05, help="fraction of sequences in the test split")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the accession-hash split")
    parser.add_argument("--overwrite", action="store_true", help="discard shards made with other arguments")
    parser.deprecated("--min-len", "--min-length")
    parser.deprecated("--max-len", "--max-length")
    return parser


def verify(store: str, progress: bool) -> dict:
    """``--verify``: print the damaged files and exit 1, or print the rate and return the manifest."""
    from proteinperformer.data.store import StoreError, TokenStore

    start = time.perf_counter()
    opened = TokenStore(store, check_sizes=False)  # refuses a store without a manifest
    problems = opened.damaged_files(progress=progress)
    size = sum(p.stat().st_size for p, _ in opened.checksummed_files() if p.exists())
    if problems:
        for line in problems:
            print(f"damaged: {line}", file=sys.stderr)
        raise StoreError(f"{store}: {len(problems)} damaged or missing file(s) (listed above); copy the store again "
                         "or rerun pp-preprocess with the same arguments")
    seconds = time.perf_counter() - start
    print(f"{store}: intact ({len(opened.checksummed_files())} files, {size / 1e6:,.1f} MB, "
          f"{size / 1e6 / max(seconds, 1e-9):,.0f} MB/s)")
    return opened.manifest


def run(args: argparse.Namespace) -> dict:
    """Build (or finish) the store, or verify one; print its counts; returns the manifest."""
    if args.verify:
        return verify(args.verify, progress=not args.quiet)
    if not args.inputs or not args.out:
        raise ValueError("give FASTA files and --out STORE (or --verify STORE)")
    from proteinperformer.data.store.preprocess import preprocess
    manifest = preprocess(
        args.inputs, args.out, workers=args.workers, chunk_mb=args.chunk_mb, on_invalid=args.on_invalid,
        min_len=args.min_length, max_len=args.max_length, dedup=args.dedup, on_duplicate_id=args.on_duplicate_id,
        holdout=args.holdout, clusters=args.clusters,
        valid_frac=args.valid_frac, test_frac=args.test_frac, split_seed=args.split_seed,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    counts = manifest["counts"]
    splits = ", ".join(f"{k} {v['sequences']:,}" for k, v in counts["splits"].items())
    print(
        f"{args.out}: {counts['sequences_kept']:,} sequences, {counts['residues_kept']:,} residues kept of "
        f"{counts['records_read']:,} records ({splits}); {manifest['run']['total_seconds']:.1f} s"
    )
    nonzero = {k: v for k, v in manifest["counters"].items() if v and k != "records_read"}
    if nonzero:
        print("normalisations / removals: " + ", ".join(f"{k} {v:,}" for k, v in nonzero.items()))
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-preprocess``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
