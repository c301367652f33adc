"""Stage 3 of ``pp-preprocess``: the shards become a store. Duplicate accessions, length filter, optional
exact-duplicate removal, split by accession hash (+ held-out OOD list), the split indexes and, last, the
manifest that readers require (see :mod:`proteinperformer.data.store.preprocess`)."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from proteinperformer.data.fasta import FastaFormatError, duplicate_id_message
from proteinperformer.data.splits import assign_split
from proteinperformer.data.store.build import crc32_of
from proteinperformer.data.store.clusters import ClusterTable, cluster_split_codes, group_by_cluster
from proteinperformer.data.store.reader import SPLIT_NAMES, STORE_VERSION
from proteinperformer.files import save_npy_atomic, write_atomic, write_text_atomic
from proteinperformer.tokenizer import Alphabet

# What finalize decided for each parsed record (metadata/*.parquet ``status``).
STATUS_KEPT, STATUS_DUP_ID, STATUS_TOO_SHORT, STATUS_TOO_LONG, STATUS_DUP_SEQ = range(5)
STATUS_NAMES = ("kept", "duplicate_id", "too_short", "too_long", "duplicate_sequence")



# ---------------------------------------------------------------------------------------------------
# 3. finalize
# ---------------------------------------------------------------------------------------------------
def read_holdout(path: str | Path) -> set[str]:
    path = Path(path)
    if not path.is_file():
        raise FastaFormatError(f"{path}: holdout list not found (one accession per line expected)")
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line.split()[0] for line in lines if line}


def _sequence_hashes(out: Path, name: str) -> np.ndarray:
    """uint64 [n, 2]: BLAKE2b-128 of each sequence's token bytes in shard ``name``."""
    tokens = np.load(out / "shards" / name / "tokens.npy", mmap_mode="r")
    offsets = np.load(out / "shards" / name / "offsets.npy")
    view = memoryview(np.ascontiguousarray(tokens))
    bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    digests = b"".join(hashlib.blake2b(view[a:b], digest_size=16).digest() for a, b in bounds)
    return np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)


def split_codes(accessions: Sequence[str], valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """``splits.assign_split`` for many accessions at once: int8 [n] indices into SPLIT_NAMES (0 train, 1 valid,
    2 test). Same BLAKE2b-of-"seed:accession" fraction and thresholds, without two Python calls per accession
    (``tests/test_store.py`` checks the two agree)."""
    assign_split("", valid_frac, test_frac, seed)  # validates the fractions
    prefix = f"{seed}:"
    digests = b"".join([hashlib.blake2b((prefix + a).encode(), digest_size=8).digest() for a in accessions])
    u = np.frombuffer(digests, dtype="<u8") / 2.0**64
    return np.where(u < valid_frac, 1, np.where(u < valid_frac + test_frac, 2, 0)).astype(np.int8)


def _split_residue_counts(out: Path, name: str, codes: np.ndarray, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
    """int64 [len(SPLIT_NAMES), vocab_size]: token-id counts of one shard's residues per split (the unigram
    baseline reads them from the manifest instead of touching every residue at training time)."""
    tokens = np.load(out / "shards" / name / "tokens.npy", mmap_mode="r")
    lengths = np.diff(np.load(out / "shards" / name / "offsets.npy"))
    per_token = np.repeat(codes.astype(np.int64) + 1, lengths)  # 0 = not kept
    bins = (len(SPLIT_NAMES) + 1) * vocab_size
    counts = np.zeros(bins, dtype=np.int64)
    for lo in range(0, len(tokens), chunk):  # bincount widens to int64: bounded chunks
        counts += np.bincount(per_token[lo : lo + chunk] * vocab_size + tokens[lo : lo + chunk], minlength=bins)
    return counts.reshape(len(SPLIT_NAMES) + 1, vocab_size)[1:]


def _split_shard(
    out: Path, name: str, status: np.ndarray, holdout: set[str], valid_frac: float, test_frac: float, seed: int,
    clusters: np.ndarray | None = None,
) -> tuple[np.ndarray, set[str], np.ndarray]:
    """Assign the kept rows of one shard to splits; write ``metadata/NAME.parquet`` (split, status).

    ``clusters``: uint64 [n] cluster (representative hash) of each row: the split follows the cluster.
    Returns (split codes int8 [n], -1 = not kept; indices into SPLIT_NAMES), the holdout accessions found and
    the residue counts per split (``_split_residue_counts``)."""
    accessions = pd.read_parquet(out / "shards" / name / "meta.parquet", columns=["accession"])["accession"].tolist()
    codes = (split_codes(accessions, valid_frac, test_frac, seed) if clusters is None
             else cluster_split_codes(clusters, valid_frac, test_frac, seed))
    codes = np.where(status == STATUS_KEPT, codes, -1).astype(np.int8)
    found: set[str] = set()
    if holdout:
        in_holdout = np.fromiter((a in holdout for a in accessions), dtype=bool, count=len(accessions))
        in_holdout &= status == STATUS_KEPT
        codes[in_holdout] = SPLIT_NAMES.index("ood")
        found = {accessions[j] for j in np.flatnonzero(in_holdout).tolist()}
    table = pd.DataFrame(
        {
            "split": pd.Categorical.from_codes(codes, categories=list(SPLIT_NAMES)),
            "status": pd.Categorical.from_codes(status.astype(np.int8), categories=list(STATUS_NAMES)),
        }
    )
    write_atomic(out / "metadata" / f"{name}.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    return codes, found, _split_residue_counts(out, name, codes, len(Alphabet().all_toks))


def _duplicate_rows(keys: np.ndarray, candidates: np.ndarray, same) -> tuple[np.ndarray, np.ndarray]:
    """Rows (among ``candidates``, ascending) whose key equals an earlier candidate's and ``same(first, row)``.

    Returns (duplicate rows, the first occurrence of each)."""
    order = candidates[np.argsort(keys[candidates], kind="stable")]
    sorted_keys = keys[order]
    dup, first = [], []
    run_start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or sorted_keys[i] != sorted_keys[run_start]:
            for j in range(run_start + 1, i):
                if same(int(order[run_start]), int(order[j])):
                    dup.append(int(order[j]))
                    first.append(int(order[run_start]))
            run_start = i
    return np.array(dup, dtype=np.int64), np.array(first, dtype=np.int64)


def _candidate_rows(keys: np.ndarray) -> np.ndarray:
    """Rows whose key occurs more than once (ascending)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeated = np.zeros(len(keys), dtype=bool)
    eq = sorted_keys[1:] == sorted_keys[:-1]
    repeated[1:] |= eq
    repeated[:-1] |= eq
    return np.sort(order[repeated])


def finalize(
    out: Path,
    summaries: list[dict],
    *,
    min_len: int | None = None,
    max_len: int | None = None,
    dedup: bool = False,
    on_duplicate_id: str = "error",
    holdout: set[str] | None = None,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    split_seed: int = 0,
    pool: cf.Executor | None = None,
    finalize_args: dict | None = None,
    clusters: ClusterTable | None = None,
) -> dict:
    """Apply duplicate/length filters and splits over all shards; write metadata, index, manifest (last).

    ``clusters``: whole clusters go to one split (holdout accessions still go to "ood"), each split's rows are
    grouped by cluster and ``index/{split}.clusters.npy`` holds the int64 [C + 1] start of every cluster."""
    names = [s["name"] for s in summaries]
    counts = np.array([s["sequences"] for s in summaries], dtype=np.int64)
    starts = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    n = int(starts[-1])
    lengths = np.zeros(n, dtype=np.int64)
    acc_hash = np.zeros(n, dtype=np.uint64)
    for i, name in enumerate(names):
        lengths[starts[i] : starts[i + 1]] = np.diff(np.load(out / "shards" / name / "offsets.npy"))
        acc_hash[starts[i] : starts[i + 1]] = np.load(out / "shards" / name / "acc_hash.npy")
    status = np.zeros(n, dtype=np.uint8)
    mapper = pool.map if pool is not None else map
    (out / "index").mkdir(exist_ok=True)
    offsets = np.zeros(n + 1, dtype=np.int64)  # the store-wide row -> token position index (ShardReader)
    np.cumsum(lengths, out=offsets[1:])
    save_npy_atomic(out / "index" / "offsets.npy", offsets)
    offsets_crc = crc32_of(offsets)
    del offsets

    def locate(rows: np.ndarray) -> pd.DataFrame:
        """accession, file, line of global ``rows``."""
        parts = []
        for i, name in enumerate(names):
            local = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
            if len(local):
                meta = pd.read_parquet(out / "shards" / name / "meta.parquet", columns=["accession", "file", "line"])
                part = meta.iloc[local].astype({"file": str})
                part.index = local + starts[i]
                parts.append(part)
        return pd.concat(parts) if parts else pd.DataFrame(columns=["accession", "file", "line"])

    # duplicate accessions (64-bit hash candidates, confirmed on the strings)
    candidates = _candidate_rows(acc_hash)
    if len(candidates):
        where = locate(candidates)
        dup, first = _duplicate_rows(
            acc_hash, candidates, lambda a, b: where.at[a, "accession"] == where.at[b, "accession"]
        )
        if len(dup) and on_duplicate_id == "error":
            k = int(np.argmin(dup))  # the earliest repeat in input order, as the in-memory reader reports it
            d, f = where.loc[dup[k]], where.loc[first[k]]
            raise FastaFormatError(duplicate_id_message(f"{d['file']}:{d['line']}", d["accession"],
                                                        f"{f['file']}:{f['line']}", len(dup)))
        status[dup] = STATUS_DUP_ID
    if min_len is not None:
        status[(status == STATUS_KEPT) & (lengths < min_len)] = STATUS_TOO_SHORT
    if max_len is not None:
        status[(status == STATUS_KEPT) & (lengths > max_len)] = STATUS_TOO_LONG
    if dedup:
        # Exact duplicates: equal length and equal 128-bit BLAKE2b (the hashes are computed in the worker pool;
        # a false match needs a 128-bit collision, ~1e-22 at 250M sequences), grouped by one numpy sort, no
        # Python loop over candidate pairs. The first row of each group is kept.
        parts = list(mapper(_sequence_hashes, [out] * len(names), names))
        seq_hash = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
        kept = np.flatnonzero(status == STATUS_KEPT)
        h1, h2, klen = seq_hash[kept, 0], seq_hash[kept, 1], lengths[kept]
        order = np.lexsort((kept, klen, h2, h1))  # by hash, then length, then row (first occurrence first)
        h1, h2, klen = h1[order], h2[order], klen[order]
        same = (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1]) & (klen[1:] == klen[:-1])
        dup = kept[order][1:][same]
        status[dup] = STATUS_DUP_SEQ

    # per shard: split of every kept row -> metadata/NAME.parquet (split, status); split row lists
    (out / "metadata").mkdir(exist_ok=True)
    rows_by_split: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_NAMES}
    holdout = holdout or set()
    holdout_found: set[str] = set()
    cluster_of = clusters.representatives(acc_hash) if clusters is not None else None
    jobs = [
        (out, name, status[starts[i] : starts[i + 1]], holdout, valid_frac, test_frac, split_seed,
         None if cluster_of is None else cluster_of[starts[i] : starts[i + 1]])
        for i, name in enumerate(names)
    ]
    results = mapper(_split_shard, *zip(*jobs, strict=True)) if jobs else []
    vocab_size = len(Alphabet().all_toks)
    residue_counts = np.zeros((len(SPLIT_NAMES), vocab_size), dtype=np.int64)
    for i, (codes, found, shard_counts) in enumerate(results):
        holdout_found |= found
        residue_counts += shard_counts
        for c, split in enumerate(SPLIT_NAMES):
            rows_by_split[split].append(np.flatnonzero(codes == c) + starts[i])
    for stale in (out / "metadata").glob("*.parquet"):
        if stale.stem not in set(names):
            stale.unlink()

    split_counts, index_checksums = {}, {}
    for split in SPLIT_NAMES:
        rows = np.concatenate(rows_by_split[split]) if names else np.zeros(0, dtype=np.int64)
        rows = rows.astype(np.int64)
        if cluster_of is not None:
            rows, cluster_starts = group_by_cluster(rows, cluster_of)
            save_npy_atomic(out / "index" / f"{split}.clusters.npy", cluster_starts)
        else:
            (out / "index" / f"{split}.clusters.npy").unlink(missing_ok=True)
        save_npy_atomic(out / "index" / f"{split}.rows.npy", rows)
        save_npy_atomic(out / "index" / f"{split}.lengths.npy", lengths[rows])
        split_counts[split] = {
            "sequences": len(rows),
            "residues": int(lengths[rows].sum()),
            "residue_counts": residue_counts[SPLIT_NAMES.index(split)].tolist(),  # by token id
            "clusters": None if cluster_of is None else len(cluster_starts) - 1,
        }
        index_checksums[f"{split}.rows.npy"] = crc32_of(rows)

    skipped = [(s["file"], line, rec_id, reason) for s in summaries for line, rec_id, reason in s["skipped"]]
    table = pd.DataFrame(skipped, columns=["file", "line", "id", "reason"])
    write_atomic(out / "skipped.parquet", lambda tmp: table.to_parquet(tmp, index=False))

    counters: Counter = Counter()
    for s in summaries:
        counters.update(s["counters"])
    for code, label in enumerate(STATUS_NAMES[1:], start=1):
        counters[label] = int(np.count_nonzero(status == code))
    kept_lengths = lengths[status == STATUS_KEPT]
    manifest = {
        "version": STORE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alphabet": Alphabet().all_toks,
        "finalize_args": finalize_args
        or {
            "min_len": min_len,
            "max_len": max_len,
            "dedup": dedup,
            "on_duplicate_id": on_duplicate_id,
            "valid_frac": valid_frac,
            "test_frac": test_frac,
            "split_seed": split_seed,
            "holdout_size": len(holdout),
        },
        "counts": {
            "records_read": int(counters["records_read"]),
            "sequences_in_shards": n,
            "residues_in_shards": int(lengths.sum()),
            "sequences_kept": int(len(kept_lengths)),
            "residues_kept": int(kept_lengths.sum()),
            "length_min_median_max": [int(x) for x in np.percentile(kept_lengths, [0, 50, 100])]
            if len(kept_lengths)
            else None,
            "longer_than_1022": int(np.count_nonzero(kept_lengths > 1022)),
            "holdout_not_found": len(holdout - holdout_found),
            "splits": split_counts,
        },
        "counters": dict(sorted(counters.items())),
        "skipped_examples": skipped[:20],
        "shards": [
            {
                k: s[k]
                for k in ("name", "file", "chunk", "first_line", "input_bytes", "sequences", "residues", "checksums")
            }
            for s in summaries
        ],
        "index_checksums": {**index_checksums, "offsets.npy": offsets_crc},
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
