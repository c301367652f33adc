"""Deterministic train/valid/test assignment by hashing the accession.

A sequence's split depends only on its accession and the split seed, never on file order or on which
other sequences are present, so adding data never moves a sequence between splits.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "valid", "test")


def split_fraction(accession: str, seed: int = 0) -> float:
    """Map an accession to a uniform number in [0, 1) (BLAKE2b of ``seed:accession``)."""
    digest = hashlib.blake2b(f"{seed}:{accession}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_split(accession: str, valid_frac: float = 0.05, test_frac: float = 0.05, seed: int = 0) -> str:
    """Return "train", "valid" or "test" for an accession; valid/test get the given fractions."""
    if not (0 <= valid_frac and 0 <= test_frac and valid_frac + test_frac < 1):
        raise ValueError(f"bad split fractions valid={valid_frac} test={test_frac}; need sum < 1")
    u = split_fraction(accession, seed)
    if u < valid_frac:
        return "valid"
    if u < valid_frac + test_frac:
        return "test"
    return "train"
