"""Streaming FASTA -> sharded token store (the TrEMBL-scale route; read it back with ``store.open_store``).

Pipeline (``preprocess``):

1. **read**: each input (plain or gzip, detected by magic bytes) is read in big binary blocks of about
   ``chunk_mb`` MB, cut after the last complete record (``b"\\n>"``). Memory is a few blocks per process,
   whatever the input size.
2. **parse + encode** (in ``workers`` processes): one block -> one shard. Records are found with numpy
   (positions of ``\\n>``), residues encoded with a 256-entry lookup table (same ids as ``Alphabet.encode``),
   headers parsed with ``parse_uniprot_header``. A shard is a directory ``shards/FFFF-CCCCCC/`` holding
   ``tokens.npy`` (uint8 residues, all records back to back), ``offsets.npy`` (int64, n + 1),
   ``meta.parquet`` (accession, header fields, length, file, line) and ``shard.json`` (counts, checksums).
   It is written to a temp directory and renamed, so a shard either exists completely or not at all.
3. **finalize** (cheap, reruns on every invocation): duplicate accessions, length filter, optional
   exact-duplicate removal, split by accession hash (+ held-out OOD list) -> ``metadata/*.parquet`` (``split``
   and ``status`` of every shard row; ``TokenStore.metadata()`` joins them to the shard tables),
   ``index/{split}.rows.npy`` / ``.lengths.npy``, ``skipped.parquet`` and finally ``manifest.json``.
   Readers refuse a store without a manifest.

Resuming: rerunning with the same inputs and parsing arguments (``chunk_mb``, ``on_invalid``) keeps every
completed shard (still re-reads the input to find the block boundaries) and re-does only the rest.
Finalize-only arguments (length filter, dedup, splits, holdout) may change between runs.

Normalisations (counted in ``manifest.json["counters"]``): Windows line endings (``cr_bytes``), lower-case
residues (accepted, as ``Alphabet.encode``), one terminal ``*`` (``stop_codon_stripped``), blank lines and
spaces inside sequences. Bad records (invalid character, no sequence, ``>`` without id) raise a
:class:`FastaFormatError` naming file, line and id (``on_invalid="error"``, default) or are skipped, counted
and listed in ``skipped.parquet`` (``on_invalid="skip"``). Duplicate accessions raise the same way (default)
or keep the first occurrence (``on_duplicate_id="skip"``). Memory note: finalize holds ~30 bytes per
sequence (lengths, hashes, row ids): about 3 GB for TrEMBL's 100M sequences.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from proteinperformer.data.fasta import FastaFormatError, parse_uniprot_header
from proteinperformer.data.splits import assign_split
from proteinperformer.data.store import SPLIT_NAMES, STORE_VERSION, ShardReader, StoreError
from proteinperformer.tokenizer import RARE_RESIDUES, STANDARD_RESIDUES, Alphabet

HEADER_FIELDS = ("accession", "db", "entry_name", "description", "OS", "OX", "GN", "PE", "SV")
STATUS_KEPT, STATUS_DUP_ID, STATUS_TOO_SHORT, STATUS_TOO_LONG, STATUS_DUP_SEQ = range(5)
STATUS_NAMES = ("kept", "duplicate_id", "too_short", "too_long", "duplicate_sequence")

# Byte -> code: residue id (5..29), or one of the markers below.
_INVALID, _WHITESPACE, _STAR = 255, 254, 253


def byte_table(alphabet: Alphabet | None = None) -> np.ndarray:
    """The 256-entry uint8 lookup table: residue letters (either case) -> ``Alphabet`` ids; whitespace, ``*``
    and anything else -> the markers 254, 253, 255."""
    alphabet = alphabet or Alphabet()
    table = np.full(256, _INVALID, dtype=np.uint8)
    for aa in STANDARD_RESIDUES + RARE_RESIDUES:
        table[ord(aa)] = table[ord(aa.lower())] = alphabet.tok_to_idx[aa]
    for ch in b"\r\n \t":
        table[ch] = _WHITESPACE
    table[ord("*")] = _STAR
    return table


TABLE = byte_table()
_TRANSLATE = TABLE.tobytes()


# ---------------------------------------------------------------------------------------------------
# 1. reading blocks of whole records
# ---------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """Whole FASTA records ``data`` (starting with '>') from input ``path``; ``first_line`` is 1-based."""

    data: bytes
    path: str
    first_line: int
    index: int
    raw_pos: int  # bytes of the (possibly compressed) input consumed so far, for progress


try:  # ISA-L inflate is 2-3x faster than zlib; optional (pip install isal), same gzip format
    from isal.igzip import IGzipFile as _GzipFile
    from isal.isal_zlib import error as _IsalError

    _GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile, OSError, _IsalError)
except ImportError:  # pragma: no cover - depends on the environment
    _GzipFile = gzip.GzipFile
    _GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def _open_binary(path: Path):
    if not path.exists():
        raise FastaFormatError(f"{path}: no such file; give the path of a FASTA file (.fasta or .fasta.gz)")
    if path.is_dir():
        raise FastaFormatError(f"{path}: is a directory, not a FASTA file")
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return raw, _GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (gzip inflation releases the GIL, so
    reading and decompressing the next block overlaps with parsing the current one). Errors are re-raised."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def iter_blocks(path: str | Path, chunk_bytes: int = 32 << 20) -> Iterator[Block]:
    """Yield blocks of about ``chunk_bytes`` holding only complete records (constant memory).

    Raises FastaFormatError for a missing path, a directory, text before the first header, and a truncated
    or corrupt gzip stream (naming the last line read). An empty file yields nothing.
    """
    path = Path(path)
    raw, handle = _open_binary(path)
    buf, line, index, started = b"", 1, 0, False
    with raw, handle:
        while True:
            try:
                piece = handle.read(chunk_bytes)
            except _GZIP_ERRORS as err:
                last = line + buf.count(b"\n")
                raise FastaFormatError(
                    f"{path}:{last}: truncated or corrupt gzip stream ({err}); re-download or re-compress the file"
                ) from None
            buf += piece
            if not started:
                stripped = buf.lstrip(b"\r\n \t")
                line += buf[: len(buf) - len(stripped)].count(b"\n")
                buf = stripped
                if not buf and piece:
                    continue
                if buf and not buf.startswith(b">"):
                    text = buf[: buf.find(b"\n")].decode("latin-1")[:40]
                    raise FastaFormatError(
                        f"{path}:{line}: sequence data before the first '>' header ({text!r}); is this a FASTA file?"
                    )
                started = True
            if not piece:
                if buf:
                    yield Block(buf, str(path), line, index, raw.tell())
                return
            cut = buf.rfind(b"\n>")
            if cut < 0:
                continue  # one record longer than a block: keep reading
            data, buf = buf[: cut + 1], buf[cut + 1 :]
            yield Block(data, str(path), line, index, raw.tell())
            line += data.count(b"\n")
            index += 1


# ---------------------------------------------------------------------------------------------------
# 2. parsing one block
# ---------------------------------------------------------------------------------------------------
@dataclass
class ParsedBlock:
    """Encoded records of one block: ``tokens`` uint8 [sum(lengths)], ``lengths`` int64 [n], header
    ``columns`` (HEADER_FIELDS -> list), ``lines`` int64 [n] (header line numbers), counters and skips."""

    tokens: np.ndarray
    lengths: np.ndarray
    columns: dict[str, list]
    lines: np.ndarray
    counters: Counter
    skipped: list[tuple[int, str, str]]  # (line, id, reason)


_RECORD_START = re.compile(rb"\n>")
_WHITESPACE_BYTES = b"\r\n \t"


def _residue_position(body: bytes, k: int) -> tuple[int, int]:
    """(byte offset, newlines before it) of the k-th (0-based) non-whitespace byte of ``body``."""
    seen = -1
    for offset, byte in enumerate(body):
        if byte not in _WHITESPACE_BYTES:
            seen += 1
            if seen == k:
                return offset, body.count(b"\n", 0, offset)
    raise IndexError(k)


def _records(data: bytes, fast: bool = True) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """Split whole records into (header bytes without '>', raw body bytes, header line offsets from the block
    start [n]). Fast path when every record looks like one header line + one sequence line; the caller must
    redo it with ``fast=False`` if a "sequence" line holds '>' (then it was a header: an empty record)."""
    if fast:
        lines = data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        heads, seqs = lines[0::2], lines[1::2]
        if len(heads) == len(seqs) and all(h[:1] == b">" for h in heads):
            return [h[1:] for h in heads], seqs, 2 * np.arange(len(heads), dtype=np.int64)
    starts = [0] + [m.start() + 1 for m in _RECORD_START.finditer(data)]
    ends = starts[1:] + [len(data)]
    find, count = data.find, data.count
    headers, bodies, newlines = [], [], []
    for s, e in zip(starts, ends, strict=True):
        he = find(b"\n", s, e)
        if he < 0:
            he = e
        headers.append(data[s + 1 : he])
        bodies.append(data[he + 1 : e])
        newlines.append(count(b"\n", s, e))
    line_offsets = np.zeros(len(starts), dtype=np.int64)
    np.cumsum(newlines[:-1], out=line_offsets[1:])
    return headers, bodies, line_offsets


def header_columns(headers: list[str]) -> dict[str, list]:
    """HEADER_FIELDS -> column (None where a header lacks the field), as ``parse_uniprot_header`` parses."""
    n = len(headers)
    if any(h[:3] in ("sp|", "tr|") for h in headers):
        fields = [parse_uniprot_header(h) for h in headers]
        return {name: [f.get(name) for f in fields] for name in HEADER_FIELDS}
    parts = [h.partition(" ") for h in headers]  # plain headers: accession = first word, description = rest
    columns: dict[str, list] = {name: [None] * n for name in HEADER_FIELDS}
    columns["accession"] = [p[0] for p in parts]
    columns["description"] = [p[2].strip() for p in parts]
    return columns


def _encode(bodies: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[bytes] | None]:
    """Translate record bodies to token ids: (tokens uint8 [sum], lengths int64 [n], per-record parts or None)."""
    joined = b"".join(bodies)
    encoded = joined.translate(_TRANSLATE, _WHITESPACE_BYTES)
    parts = None
    if len(encoded) == len(joined):  # no whitespace inside sequences: lengths are the body lengths
        lengths = np.fromiter(map(len, bodies), dtype=np.int64, count=len(bodies))
    else:
        parts = [b.translate(_TRANSLATE, _WHITESPACE_BYTES) for b in bodies]
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    return np.frombuffer(encoded, dtype=np.uint8), lengths, parts


def parse_block(data: bytes, path: str, first_line: int = 1, on_invalid: str = "error") -> ParsedBlock:
    """Parse and encode whole FASTA records (``data`` starts with '>').

    Residues are encoded with ``bytes.translate`` and the 256-entry table of ``byte_table`` (which also deletes
    whitespace). ``on_invalid="error"`` raises FastaFormatError naming file, line and id for a record with an
    invalid character, no sequence, or no id; ``"skip"`` drops such records, counts them and lists them in
    ``skipped``. One terminal ``*`` per record is stripped and counted.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    raw_headers, bodies, line_offsets = _records(data)
    tokens, lengths, parts = _encode(bodies)
    if len(tokens) and tokens.max() >= _STAR and any(b[:1] == b">" for b in bodies):
        # '>' in a "sequence" line: a record without sequence fooled the fast path; split properly
        raw_headers, bodies, line_offsets = _records(data, fast=False)
        tokens, lengths, parts = _encode(bodies)
    lines = line_offsets + first_line
    headers = [h.strip() for h in b"\n".join(raw_headers).decode("latin-1").split("\n")]
    columns = header_columns(headers)
    counters: Counter = Counter(records_read=len(bodies), cr_bytes=data.count(b"\r"))

    problems: dict[int, tuple[str, str, int]] = {}  # record -> (reason, detail, line)
    if len(tokens) and tokens.max() >= _STAR:  # slow path: '*' or invalid characters somewhere
        if parts is None:
            parts = [b.translate(_TRANSLATE, _WHITESPACE_BYTES) for b in bodies]
        for rec, part in enumerate(parts):
            bad = part.find(bytes([_INVALID]))
            star = part.find(bytes([_STAR]))
            if star == len(part) - 1 and bad < 0:
                parts[rec] = part[:-1]
                counters["stop_codon_stripped"] += 1
                continue
            k = min(i for i in (bad, star) if i >= 0) if (bad >= 0 or star >= 0) else -1
            if k >= 0:
                offset, extra_lines = _residue_position(bodies[rec], k)
                at_line = int(lines[rec]) + 1 + extra_lines
                detail = f"invalid character {chr(bodies[rec][offset])!r} at residue {k + 1} (line {at_line})"
                problems[rec] = ("invalid_character", detail, int(lines[rec]))
        tokens = np.frombuffer(b"".join(parts), dtype=np.uint8)
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    for rec, accession in enumerate(columns["accession"]):
        if not accession:
            problems.setdefault(rec, ("no_id", "header '>' has no identifier", int(lines[rec])))
    for rec in np.flatnonzero(lengths == 0).tolist():
        problems.setdefault(rec, ("empty", "has no sequence", int(lines[rec])))

    skipped: list[tuple[int, str, str]] = []
    if problems:
        first = min(problems)
        if on_invalid == "error":
            _, detail, line = problems[first]
            rec_id = columns["accession"][first] or "<no id>"
            hint = "fix or remove the record, or rerun with --on-invalid skip"
            raise FastaFormatError(f"{path}:{line}: record {rec_id!r} {detail}; {hint}")
        keep = np.ones(len(bodies), dtype=bool)
        for rec, (reason, _, line) in sorted(problems.items()):
            keep[rec] = False
            counters[f"skipped_{reason}"] += 1
            skipped.append((line, columns["accession"][rec] or "", reason))
        tokens = tokens[np.repeat(keep, lengths)]
        lengths, lines = lengths[keep], lines[keep]
        kept = keep.tolist()
        columns = {name: [v for v, k in zip(col, kept, strict=True) if k] for name, col in columns.items()}
    return ParsedBlock(tokens, lengths, columns, lines, counters, skipped)


# ---------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------
def crc32_of(array: np.ndarray) -> str:
    """CRC-32 of an array's bytes as 8 hex digits (integrity check, not security)."""
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B')):08x}"


def shard_name(file_index: int, chunk_index: int) -> str:
    return f"{file_index:04d}-{chunk_index:06d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def process_block(block: Block, file_index: int, shard_root: str, on_invalid: str) -> dict:
    """Parse one block and write it as shard ``shard_root/NAME`` (temp dir + rename); return its summary."""
    parsed = parse_block(block.data, block.path, block.first_line, on_invalid)
    name = shard_name(file_index, block.index)
    final = Path(shard_root) / name
    tmp = Path(shard_root) / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    offsets = np.zeros(len(parsed.lengths) + 1, dtype=np.int64)
    np.cumsum(parsed.lengths, out=offsets[1:])
    np.save(tmp / "tokens.npy", parsed.tokens)
    np.save(tmp / "offsets.npy", offsets)
    accessions = np.array(parsed.columns["accession"], dtype=object)
    np.save(
        tmp / "acc_hash.npy",
        pd.util.hash_array(accessions, categorize=False) if len(accessions) else np.zeros(0, np.uint64),
    )
    n = len(parsed.lengths)
    meta = {name: pa.array(values, type=pa.string()) for name, values in parsed.columns.items()}
    meta["length"] = pa.array(parsed.lengths)
    meta["file"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([block.path]))
    meta["line"] = pa.array(parsed.lines)
    pq.write_table(pa.table(meta), tmp / "meta.parquet")  # pyarrow directly: 3x cheaper than via pandas
    summary = {
        "name": name,
        "file": block.path,
        "file_index": file_index,
        "chunk": block.index,
        "first_line": block.first_line,
        "input_bytes": len(block.data),
        "sequences": len(parsed.lengths),
        "residues": int(offsets[-1]),
        "counters": dict(parsed.counters),
        "skipped": parsed.skipped,
        "checksums": {"tokens.npy": crc32_of(parsed.tokens), "offsets.npy": crc32_of(offsets)},
    }
    (tmp / "shard.json").write_text(json.dumps(summary))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return summary


def _load_shard_summary(shard_root: Path, name: str) -> dict | None:
    path = shard_root / name / "shard.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------------
# 3. finalize
# ---------------------------------------------------------------------------------------------------
def _read_holdout(path: str | Path) -> set[str]:
    path = Path(path)
    if not path.is_file():
        raise FastaFormatError(f"{path}: holdout list not found (one accession per line expected)")
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line.split()[0] for line in lines if line}


def _sequence_hashes(out: Path, name: str) -> np.ndarray:
    """uint64 [n]: BLAKE2b-64 of each sequence's token bytes in shard ``name``."""
    tokens = np.load(out / "shards" / name / "tokens.npy", mmap_mode="r")
    offsets = np.load(out / "shards" / name / "offsets.npy")
    view = memoryview(np.ascontiguousarray(tokens))
    bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    digests = b"".join(hashlib.blake2b(view[a:b], digest_size=8).digest() for a, b in bounds)
    return np.frombuffer(digests, dtype=np.uint64)


def split_codes(accessions: Sequence[str], valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """``splits.assign_split`` for many accessions at once: int8 [n] indices into SPLIT_NAMES (0 train, 1 valid,
    2 test). Same BLAKE2b-of-"seed:accession" fraction and thresholds, without two Python calls per accession
    (``tests/test_store.py`` checks the two agree)."""
    assign_split("", valid_frac, test_frac, seed)  # validates the fractions
    prefix = f"{seed}:"
    digests = b"".join([hashlib.blake2b((prefix + a).encode(), digest_size=8).digest() for a in accessions])
    u = np.frombuffer(digests, dtype="<u8") / 2.0**64
    return np.where(u < valid_frac, 1, np.where(u < valid_frac + test_frac, 2, 0)).astype(np.int8)


def _split_shard(
    out: Path, name: str, status: np.ndarray, holdout: set[str], valid_frac: float, test_frac: float, seed: int
) -> tuple[np.ndarray, set[str]]:
    """Assign the kept rows of one shard to splits; write ``metadata/NAME.parquet`` (split, status).

    Returns (split codes int8 [n], -1 = not kept; indices into SPLIT_NAMES) and the holdout accessions found."""
    accessions = pd.read_parquet(out / "shards" / name / "meta.parquet", columns=["accession"])["accession"].tolist()
    codes = np.where(status == STATUS_KEPT, split_codes(accessions, valid_frac, test_frac, seed), -1).astype(np.int8)
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
    tmp = out / "metadata" / f".{name}.parquet.tmp-{os.getpid()}"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / "metadata" / f"{name}.parquet")
    return codes, found


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
) -> dict:
    """Apply duplicate/length filters and splits over all shards; write metadata, index, manifest (last)."""
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
            d, f = where.loc[dup[0]], where.loc[first[0]]
            raise FastaFormatError(
                f"{d['file']}:{d['line']}: duplicate id {d['accession']!r} (first seen at {f['file']}:{f['line']}); "
                f"{len(dup)} duplicate accession(s) in all; ids must be unique, or rerun with --on-duplicate-id skip"
            )
        status[dup] = STATUS_DUP_ID
    if min_len is not None:
        status[(status == STATUS_KEPT) & (lengths < min_len)] = STATUS_TOO_SHORT
    if max_len is not None:
        status[(status == STATUS_KEPT) & (lengths > max_len)] = STATUS_TOO_LONG
    if dedup:
        seq_hash = np.concatenate(list(mapper(_sequence_hashes, [out] * len(names), names))) if names else acc_hash
        kept = np.flatnonzero(status == STATUS_KEPT)
        candidates = kept[_candidate_rows(seq_hash[kept])]
        shards = ShardReader(out, names, starts)
        dup, _ = _duplicate_rows(seq_hash, candidates, lambda a, b: np.array_equal(shards.row(a), shards.row(b)))
        status[dup] = STATUS_DUP_SEQ

    # per shard: split of every kept row -> metadata/NAME.parquet (split, status); split row lists
    (out / "metadata").mkdir(exist_ok=True)
    (out / "index").mkdir(exist_ok=True)
    rows_by_split: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_NAMES}
    holdout = holdout or set()
    holdout_found: set[str] = set()
    jobs = [
        (out, name, status[starts[i] : starts[i + 1]], holdout, valid_frac, test_frac, split_seed)
        for i, name in enumerate(names)
    ]
    results = mapper(_split_shard, *zip(*jobs, strict=True)) if jobs else []
    for i, (codes, found) in enumerate(results):
        holdout_found |= found
        for c, split in enumerate(SPLIT_NAMES):
            rows_by_split[split].append(np.flatnonzero(codes == c) + starts[i])
    for stale in (out / "metadata").glob("*.parquet"):
        if stale.stem not in set(names):
            stale.unlink()

    split_counts, index_checksums = {}, {}
    for split in SPLIT_NAMES:
        rows = np.concatenate(rows_by_split[split]) if names else np.zeros(0, dtype=np.int64)
        rows = rows.astype(np.int64)
        _atomic_save_npy(out / "index" / f"{split}.rows.npy", rows)
        _atomic_save_npy(out / "index" / f"{split}.lengths.npy", lengths[rows])
        split_counts[split] = {"sequences": len(rows), "residues": int(lengths[rows].sum())}
        index_checksums[f"{split}.rows.npy"] = crc32_of(rows)

    skipped = [(s["file"], line, rec_id, reason) for s in summaries for line, rec_id, reason in s["skipped"]]
    table = pd.DataFrame(skipped, columns=["file", "line", "id", "reason"])
    table.to_parquet(out / ".skipped.parquet.tmp", index=False)
    os.replace(out / ".skipped.parquet.tmp", out / "skipped.parquet")

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
        "finalize_args": {
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
        "index_checksums": index_checksums,
    }
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# ---------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------
def _check_config(out: Path, config: dict, overwrite: bool) -> None:
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != config:
            if not overwrite:
                raise StoreError(
                    f"{out}: this store was started with other inputs or parsing arguments "
                    f"(was {old}, now {config}); use another output directory or pass --overwrite"
                )
            shutil.rmtree(out / "shards", ignore_errors=True)
    elif out.exists() and any(out.iterdir()) and not (out / "shards").exists():
        raise StoreError(f"{out}: exists, is not empty and is not a token store; choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the store is incomplete until finalize ends
    (out / "shards").mkdir(exist_ok=True)
    for leftover in (out / "shards").glob(".*.tmp-*"):  # half-written shards of a killed run
        shutil.rmtree(leftover)
    _atomic_write_text(path, json.dumps(config, indent=1))


def preprocess(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    workers: int = 1,
    chunk_mb: float = 32,
    on_invalid: str = "error",
    min_len: int | None = None,
    max_len: int | None = None,
    dedup: bool = False,
    on_duplicate_id: str = "error",
    holdout: str | Path | None = None,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    split_seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """FASTA files -> token store at ``out``; returns the manifest (see the module docstring).

    ``workers`` parse processes (1 = parse in this process). Resumable: completed shards are kept.
    """
    if not inputs:
        raise ValueError("no input FASTA files given")
    if on_duplicate_id not in ("error", "skip"):
        raise ValueError(f"on_duplicate_id must be 'error' or 'skip', got {on_duplicate_id!r}")
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    paths = [Path(p).resolve() for p in inputs]
    for p in paths:
        _open_binary(p)[0].close()  # missing file / directory -> FastaFormatError before anything is written
    holdout_set = _read_holdout(holdout) if holdout else None
    out = Path(out)
    chunk_bytes = int(chunk_mb * (1 << 20))
    config = {
        "version": STORE_VERSION,
        "inputs": [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths],
        "chunk_bytes": chunk_bytes,
        "on_invalid": on_invalid,
    }
    _check_config(out, config, overwrite)
    shard_root = out / "shards"
    total = sum(p.stat().st_size for p in paths)
    summaries: dict[str, dict] = {}
    reused = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not progress, smoothing=0.1)
    residues = 0

    def record(summary: dict) -> None:
        nonlocal residues
        summaries[summary["name"]] = summary
        residues += summary["residues"]
        bar.set_postfix_str(f"{residues / max(time.perf_counter() - t0, 1e-9) / 1e6:.1f}M residues/s")

    pool = cf.ProcessPoolExecutor(workers) if workers > 1 else None
    if pool is not None:
        pool.submit(int).result()  # fork all workers now, before the prefetch thread exists
    pending: set[cf.Future] = set()
    done_bytes = 0
    try:
        for file_index, path in enumerate(paths):
            for block in prefetch(iter_blocks(path, chunk_bytes)):
                name = shard_name(file_index, block.index)
                existing = _load_shard_summary(shard_root, name)
                if existing is not None and existing["input_bytes"] == len(block.data):
                    record(existing)
                    reused += 1
                elif pool is None:
                    record(process_block(block, file_index, str(shard_root), on_invalid))
                else:
                    pending.add(pool.submit(process_block, block, file_index, str(shard_root), on_invalid))
                    if len(pending) >= 2 * workers:
                        finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        for future in finished:
                            record(future.result())
                bar.update(done_bytes + block.raw_pos - bar.n)
            done_bytes += path.stat().st_size
            bar.update(done_bytes - bar.n)
        for future in cf.as_completed(pending):
            record(future.result())
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    ordered = [summaries[k] for k in sorted(summaries)]
    per_file: Counter = Counter()
    for s in ordered:
        per_file[s["file"]] += s["counters"].get("records_read", 0)
    for path in paths:
        if per_file[str(path)] == 0:
            raise FastaFormatError(f"{path}: no FASTA records found (empty file?)")
    parse_seconds = time.perf_counter() - t0
    manifest = finalize(
        out,
        ordered,
        min_len=min_len,
        max_len=max_len,
        dedup=dedup,
        on_duplicate_id=on_duplicate_id,
        holdout=holdout_set,
        valid_frac=valid_frac,
        test_frac=test_frac,
        split_seed=split_seed,
        pool=pool,
    )
    if pool is not None:
        pool.shutdown()
    manifest["run"] = {
        "workers": workers,
        "shards_reused": reused,
        "parse_seconds": round(parse_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "input_bytes": total,
    }
    manifest["inputs"] = config["inputs"]
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pp-preprocess",
        description="Stream FASTA files (plain or .gz) into a sharded token store for training.",
    )
    parser.add_argument("inputs", nargs="+", help="FASTA files (.fasta / .fasta.gz)")
    parser.add_argument("--out", required=True, help="output store directory")
    parser.add_argument("--workers", type=int, default=1, help="parse processes (1 = in this process)")
    parser.add_argument("--chunk-mb", type=float, default=32, help="FASTA megabytes per shard")
    parser.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="records with invalid characters, no sequence or no id: fail, or skip and count",
    )
    parser.add_argument(
        "--on-duplicate-id",
        choices=("error", "skip"),
        default="error",
        help="repeated accessions: fail, or keep the first and count the rest",
    )
    parser.add_argument("--min-len", type=int, default=None, help="drop (and count) shorter sequences")
    parser.add_argument("--max-len", type=int, default=None, help="drop (and count) longer sequences")
    parser.add_argument("--dedup", action="store_true", help="remove exact duplicate sequences (first kept)")
    parser.add_argument("--holdout", default=None, help="file of accessions (one per line) for the 'ood' split")
    parser.add_argument("--valid-frac", type=float, default=0.05)
    parser.add_argument("--test-frac", type=float, default=0.05)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="discard shards made with other arguments")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``pp-preprocess``."""
    args = build_parser().parse_args(argv)
    try:
        manifest = preprocess(
            args.inputs,
            args.out,
            workers=args.workers,
            chunk_mb=args.chunk_mb,
            on_invalid=args.on_invalid,
            min_len=args.min_len,
            max_len=args.max_len,
            dedup=args.dedup,
            on_duplicate_id=args.on_duplicate_id,
            holdout=args.holdout,
            valid_frac=args.valid_frac,
            test_frac=args.test_frac,
            split_seed=args.split_seed,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (FastaFormatError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    splits = ", ".join(f"{k} {v['sequences']:,}" for k, v in counts["splits"].items())
    print(
        f"{args.out}: {counts['sequences_kept']:,} sequences, {counts['residues_kept']:,} residues kept of "
        f"{counts['records_read']:,} records ({splits}); {manifest['run']['total_seconds']:.1f} s"
    )
    nonzero = {k: v for k, v in manifest["counters"].items() if v and k != "records_read"}
    if nonzero:
        print("normalisations / removals: " + ", ".join(f"{k} {v:,}" for k, v in nonzero.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
