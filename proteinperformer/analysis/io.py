"""Loading a model checkpoint and a set of protein sequences for the analyses."""

from __future__ import annotations

import random
from pathlib import Path

from proteinperformer.data.fasta import read_fasta
from proteinperformer.embed import load_model  # the project's checkpoint loader (PerformerLM, eval mode)

__all__ = ["load_model", "read_sequences"]


def read_sequences(
    path: str | Path, n: int | None = None, min_len: int = 30, max_len: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """(id, sequence) pairs from a FASTA file: those with ≥ ``min_len`` residues, longer ones cropped to
    ``max_len``; a random subset of ``n`` (fixed ``seed``) when ``n`` is given, in file order."""
    records = [(r.id, r.sequence.upper().rstrip("*")) for r in read_fasta(path)]
    records = [(i, s[:max_len] if max_len else s) for i, s in records if len(s) >= min_len]
    if n is not None and n < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), n))
        records = [records[i] for i in keep]
    return records
