"""Cluster membership for ``pp-preprocess --clusters``: whole clusters to one split, cluster ranges per split.

The TSV is MMseqs2 ``createtsv`` output (``representative TAB member``, one line per member, the representative
also listed as its own member) or any table of that shape (a UniRef50 -> UniRef90 membership table). It is
read in chunks with pandas and kept only as 64-bit accession hashes (``pd.util.hash_array``, as the shards'
``acc_hash.npy``): 24 bytes per line (two hashes and a line number), never a Python object per line.

A corpus sequence missing from the TSV is a cluster of its own (its representative is itself). The split of a
cluster is a function of (split seed, its representative's hash), so every member lands in the same split.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from proteinperformer.data.fasta import FastaFormatError


def hash_accessions(accessions: np.ndarray) -> np.ndarray:
    """uint64 hashes of accession strings, the same function as the shards' ``acc_hash.npy``."""
    accessions = np.asarray(accessions, dtype=object)
    return pd.util.hash_array(accessions, categorize=False) if len(accessions) else np.zeros(0, np.uint64)


def file_digest(path: Path) -> str:
    """Identity of an input file for the finished-store check: path, size and mtime (not its content)."""
    stat = path.stat()
    return hashlib.blake2b(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8).hexdigest()


class ClusterTable:
    """Member hash -> representative hash, from a clusters TSV (see the module docstring)."""

    def __init__(self, members: np.ndarray, reps: np.ndarray, lines: np.ndarray, path: Path) -> None:
        order = np.argsort(members, kind="stable")
        self.members, self.reps, self.lines, self.path = members[order], reps[order], lines[order], path

    @classmethod
    def read(cls, path: str | Path, chunk_lines: int = 2_000_000) -> ClusterTable:
        """Parse the TSV; a line without two columns or a member listed twice is a one-line error naming the
        file and line."""
        path = Path(path)
        if not path.is_file():
            raise FastaFormatError(f"{path}: clusters file not found (MMseqs2 createtsv format: representative TAB "
                                   "member, one line per member)")
        members, reps, lines = [], [], []
        try:
            reader = pd.read_csv(path, sep="\t", header=None, names=["rep", "member"], dtype=str,
                                 chunksize=chunk_lines, skip_blank_lines=False, quoting=3, engine="c",
                                 keep_default_na=False)
            first = 1
            for chunk in reader:
                line_no = np.arange(first, first + len(chunk), dtype=np.int64)
                first += len(chunk)
                rep, member = chunk["rep"].str.strip(), chunk["member"].str.strip()
                blank = (rep == "") & (member == "")
                bad = (~blank & ((rep == "") | (member == ""))).to_numpy()
                if bad.any():
                    at = int(line_no[np.argmax(bad)])
                    raise FastaFormatError(f"{path}:{at}: expected 2 tab-separated columns (representative TAB "
                                           "member); fix the line or regenerate the file with mmseqs createtsv")
                keep = ~blank.to_numpy()
                reps.append(hash_accessions(rep.to_numpy()[keep]))
                members.append(hash_accessions(member.to_numpy()[keep]))
                lines.append(line_no[keep])
        except pd.errors.ParserError as err:  # a line with more than 2 columns
            found = re.search(r"line (\d+)", str(err))
            where = f"{path}:{found.group(1)}" if found else str(path)
            raise FastaFormatError(f"{where}: expected 2 tab-separated columns (representative TAB member), found "
                                   "more; fix the line or regenerate the file with mmseqs createtsv") from None
        cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))  # noqa: E731
        table = cls(cat(members, np.uint64), cat(reps, np.uint64), cat(lines, np.int64), path)
        twice = np.flatnonzero(table.members[1:] == table.members[:-1])
        if len(twice):
            a, b = sorted((int(table.lines[twice[0]]), int(table.lines[twice[0] + 1])))
            raise FastaFormatError(f"{path}:{b}: member already listed at line {a}; a sequence belongs to one "
                                   "cluster only (one line per member)")
        return table

    def representatives(self, acc_hash: np.ndarray) -> np.ndarray:
        """uint64 [n]: the cluster (representative hash) of each corpus accession hash; itself if unlisted.

        Raises FastaFormatError naming the first TSV line whose member is not in the corpus."""
        known = np.sort(acc_hash)
        pos = np.searchsorted(known, self.members).clip(max=max(len(known) - 1, 0))
        unknown = np.flatnonzero(known[pos] != self.members) if len(known) else np.arange(len(self.members))
        if len(unknown):
            line = int(self.lines[unknown].min())
            raise FastaFormatError(f"{self.path}:{line}: member not in the input FASTA ({len(unknown)} such line(s)); "
                                   "the clusters file must describe the same sequences (cluster the FASTA given "
                                   "to pp-preprocess, or drop the lines of other sequences)")
        out = acc_hash.copy()
        pos = np.searchsorted(self.members, acc_hash).clip(max=max(len(self.members) - 1, 0))
        listed = self.members[pos] == acc_hash if len(self.members) else np.zeros(len(acc_hash), bool)
        out[listed] = self.reps[pos[listed]]
        return out


def cluster_split_codes(cluster: np.ndarray, valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """int8 [n]: 0 train, 1 valid, 2 test from (seed, cluster hash): uniform in [0, 1) by SplitMix64."""
    x = cluster.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    u = (x >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.where(u < valid_frac, 1, np.where(u < valid_frac + test_frac, 2, 0)).astype(np.int8)


def group_by_cluster(rows: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows reordered so each cluster's members are contiguous (clusters in order of their first row), and
    the int64 [C + 1] start of each cluster in that order."""
    keys = clusters[rows]
    by_key = np.argsort(keys, kind="stable")  # positions grouped by cluster, ascending within each
    sorted_keys = keys[by_key]
    first = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])) if len(rows) else \
        np.zeros(0, np.int64)
    sizes = np.diff(np.append(first, len(rows)))
    cluster_first = np.repeat(by_key[first], sizes)  # each position's cluster's first position
    order = by_key[np.argsort(cluster_first, kind="stable")]
    starts = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(sizes[np.argsort(by_key[first], kind="stable")], out=starts[1:])
    return rows[order], starts
