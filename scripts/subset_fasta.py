"""Write the first records of a FASTA file (plain or .gz) to a gzipped FASTA of at most a given size.

    python scripts/subset_fasta.py "$PP_SHARED_DATA/uniprot/swissprot_go_2014.fasta.gz" \
        data/swissprot_gpu.fasta.gz --max-mb 38

The training data of ``experiment=reference_gpu`` (which must fit in 40 MB beside the repository). Records are
copied unchanged (Biopython parses and writes them), in file order, until the compressed output would pass
``--max-mb``; the output is written to a temp file and renamed, so a killed run leaves no half-written file.
The DataModule's accession-hash split assigns each kept record to the split it has in the full file.
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

from Bio import SeqIO


def subset_fasta(src: Path, dst: Path, max_bytes: int) -> int:
    """Copy records of ``src`` into gzipped ``dst`` while its size stays ≤ max_bytes; returns records written."""
    opener = gzip.open if src.suffix == ".gz" else open
    tmp = dst.with_name(dst.name + ".tmp")
    # raw.tell() counts the compressed bytes flushed so far; the compressor holds back well under this margin
    stop_at = max_bytes - min(1_000_000, max_bytes // 10)
    written = 0
    with opener(src, "rt") as handle, open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as out:
        for record in SeqIO.parse(handle, "fasta"):
            if raw.tell() > stop_at:
                break
            out.write(f">{record.description}\n{record.seq}\n".encode())
            written += 1
    os.replace(tmp, dst)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--max-mb", type=float, default=38.0, help="size limit of the gzipped output (MB)")
    args = parser.parse_args(argv)
    if not args.src.exists():
        raise SystemExit(f"error: {args.src}: no such file")
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    n = subset_fasta(args.src, args.dst, int(args.max_mb * 1e6))
    print(f"wrote {n:,} records to {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
