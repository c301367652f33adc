"""Stages 1 and 2 of ``pp-preprocess``: FASTA read in big binary blocks, each block parsed and encoded into one
shard directory (see :mod:`proteinperformer.data.store.preprocess` for the whole pipeline and the layout)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from proteinperformer.data.fasta import FastaFormatError, parse_uniprot_header
from proteinperformer.tokenizer import RARE_RESIDUES, STANDARD_RESIDUES, Alphabet

HEADER_FIELDS = ("accession", "db", "entry_name", "description", "OS", "OX", "GN", "PE", "SV")

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


def open_binary(path: Path):
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
    raw, handle = open_binary(path)
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


def load_shard_summary(shard_root: Path, name: str) -> dict | None:
    path = shard_root / name / "shard.json"
    return json.loads(path.read_text()) if path.exists() else None
