"""FASTA reading: one streaming reader for every route (training in memory, ``pp-preprocess``, inference).

A file is read in big binary blocks that hold whole records (:func:`iter_blocks`; gzip is recognised by its magic
bytes, whatever the file is called), and each block is split into records and encoded with a 256-entry lookup
table (:func:`parse_block`): memory is a block or two whatever the file size, and a record costs microseconds.
:func:`read_fasta` yields the records one at a time on top of that; the token-store builder and the in-memory
training route (``TokenizedSequences.from_fasta``) take the parsed blocks as they are. So every route applies the
same rules:

- residues are the alphabet's letters (the 20 standard ones and X B Z U O) in upper or lower case; one terminal
  ``*`` (a stop codon in translated FASTA) is dropped; whitespace inside a sequence, blank lines and Windows line
  ends are ignored;
- bad input raises :class:`FastaFormatError`, one line naming the file and line (and the record id): a missing
  path or a directory, text before the first header, a header without id, a record without sequence, an invalid
  character (with its residue number and line), a truncated or corrupt gzip stream, a file without records, a
  duplicate id (:func:`duplicate_id_message`, worded alike by ``pp-preprocess``, which finds them across files).

Why not ``Bio.SeqIO``: we need the line number of every record for error messages, and strict handling of the
malformed inputs real corpora contain (text before the first header, empty records, truncated gzip). Biopython's
parsers report neither line numbers nor empty records, and parse one record at a time in Python.
"""

from __future__ import annotations

import gzip
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from proteinperformer.tokenizer import Alphabet, TokenizationError


class FastaFormatError(ValueError):
    """A FASTA file is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class FastaRecord:
    """One FASTA record: ``id`` (accession for UniProt headers, else the first word), the header line
    without '>', the sequence (line breaks removed) and the 1-based line number of its header."""

    id: str
    header: str
    sequence: str
    path: str = ""
    line: int = 0
    fields: dict[str, str] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------------
# headers
# ---------------------------------------------------------------------------------------------------
_UNIPROT_ID = re.compile(r"^(sp|tr)\|([^|\s]+)\|(\S+)\s*(.*)$")
_UNIPROT_KEY = re.compile(r"\s(OS|OX|GN|PE|SV)=")
HEADER_FIELDS = ("accession", "db", "entry_name", "description", "OS", "OX", "GN", "PE", "SV")


def parse_uniprot_header(header: str) -> dict[str, str]:
    """Parse a FASTA header (without '>') into fields.

    UniProt headers ``db|ACCESSION|ENTRY_NAME description OS=.. OX=.. GN=.. PE=.. SV=..`` give the keys
    db, accession, entry_name, description and whichever of OS/OX/GN/PE/SV are present. Any other header
    gives ``accession`` = first word and ``description`` = the rest.
    """
    header = header.strip()
    match = _UNIPROT_ID.match(header)
    if not match:
        first, _, rest = header.partition(" ")
        return {"accession": first, "description": rest.strip()}
    db, accession, entry_name, rest = match.groups()
    out = {"db": db, "accession": accession, "entry_name": entry_name}
    # Split "description OS=Homo sapiens OX=9606 GN=X PE=1 SV=2" at each known key.
    parts = _UNIPROT_KEY.split(" " + rest)
    out["description"] = parts[0].strip()
    for key, value in zip(parts[1::2], parts[2::2], strict=True):
        out[key] = value.strip()
    return out


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


def duplicate_id_message(where: str, rec_id: str, first_where: str, count: int) -> str:
    """The duplicate-id error (``where`` / ``first_where``: "file:line"), the same from every route."""
    return (f"{where}: duplicate id {rec_id!r} (first seen at {first_where}); {count} duplicate accession(s) in all; "
            "ids must be unique (pp-preprocess --on-duplicate-id skip keeps the first)")


def check_unique_ids(path: str | Path, ids: Sequence[str], lines: Sequence[int]) -> None:
    """Raise FastaFormatError at the first id of one file that repeats an earlier one (see above)."""
    seen: dict[str, int] = {}
    repeats: list[tuple[int, str]] = []
    for rec_id, line in zip(ids, lines, strict=True):
        if rec_id in seen:
            repeats.append((int(line), rec_id))
        else:
            seen[rec_id] = int(line)
    if repeats:
        line, rec_id = repeats[0]
        raise FastaFormatError(duplicate_id_message(f"{path}:{line}", rec_id, f"{path}:{seen[rec_id]}", len(repeats)))


# ---------------------------------------------------------------------------------------------------
# 1. reading blocks of whole records
# ---------------------------------------------------------------------------------------------------
try:  # ISA-L inflate is 2-3x faster than zlib; optional (pip install isal), same gzip format
    from isal.igzip import IGzipFile as _GzipFile
    from isal.isal_zlib import error as _IsalError

    _GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile, OSError, _IsalError)
except ImportError:  # pragma: no cover - depends on the environment
    _GzipFile = gzip.GzipFile
    _GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def open_fasta(path: str | Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, its bytes): decompressed when the file starts with gzip's magic bytes, whatever its name.

    Raises FastaFormatError for a missing path or a directory. Close the raw file when done.
    """
    path = Path(path)
    if not path.exists():
        raise FastaFormatError(f"{path}: no such file; give the path of a FASTA file (.fasta or .fasta.gz)")
    if path.is_dir():
        raise FastaFormatError(f"{path}: is a directory, not a FASTA file")
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    return (raw, _GzipFile(fileobj=raw, mode="rb")) if magic == b"\x1f\x8b" else (raw, raw)


@dataclass
class Block:
    """Whole FASTA records ``data`` (starting with '>') from input ``path``; ``first_line`` is 1-based."""

    data: bytes
    path: str
    first_line: int
    index: int
    raw_pos: int  # bytes of the (possibly compressed) input consumed so far, for progress


def iter_blocks(path: str | Path, chunk_bytes: int = 32 << 20) -> Iterator[Block]:
    """Yield blocks of about ``chunk_bytes`` holding only complete records (constant memory).

    Raises FastaFormatError for a missing path, a directory, text before the first header, a truncated or
    corrupt gzip stream (naming the last line read) and a file without records (empty or blank).
    """
    path = Path(path)
    raw, handle = open_fasta(path)
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
                stripped = buf.lstrip(_WHITESPACE)
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
                elif index == 0:
                    raise FastaFormatError(f"{path}: no FASTA records found (empty file?)")
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
_STAR, _INVALID = 254, 255  # lookup-table codes besides the residue ids
_WHITESPACE = b"\r\n \t"
_RECORD_START = re.compile(rb"\n>")
_INVALID_HINT = "fix or remove the record (pp-preprocess --on-invalid skip drops such records)"
_TABLES: dict[tuple[str, ...], bytes] = {}


def residue_table(alphabet: Alphabet) -> bytes:
    """The ``bytes.translate`` table of ``alphabet``: its residue letters (either case) -> their ids, ``*`` ->
    254, any other byte -> 255 (whitespace is deleted by the translation itself)."""
    key = tuple(alphabet.all_toks)
    if key not in _TABLES:
        if alphabet.tags or len(alphabet) > _STAR:
            raise ValueError("residue_table: only letter vocabularies (no tags, < 254 tokens) are encoded by table")
        table = np.full(256, _INVALID, dtype=np.uint8)
        for aa in alphabet.letters:
            table[ord(aa)] = table[ord(aa.lower())] = alphabet.tok_to_idx[aa]
        table[ord("*")] = _STAR
        _TABLES[key] = table.tobytes()
    return _TABLES[key]


@dataclass
class ParsedBlock:
    """The records of one block, in file order: ``headers`` (without '>'), header ``fields`` (HEADER_FIELDS ->
    column), ``lines`` int64 [n] (header line numbers), ``bodies`` (the raw sequence bytes), ``lengths`` int64 [n]
    (residues), ``tokens`` uint8 [sum(lengths)] (residue ids back to back; None when parsed without an alphabet),
    ``counters`` (records read, normalisations, skips) and ``skipped`` ((line, id, reason) of dropped records)."""

    headers: list[str]
    fields: dict[str, list]
    lines: np.ndarray
    bodies: list[bytes]
    lengths: np.ndarray
    tokens: np.ndarray | None
    counters: Counter
    skipped: list[tuple[int, str, str]]

    @property
    def ids(self) -> list[str]:
        return self.fields["accession"]

    def sequence(self, i: int) -> str:
        """Record ``i``'s sequence as written, whitespace removed."""
        return self.bodies[i].translate(None, _WHITESPACE).decode("latin-1")


def _residue_position(body: bytes, k: int) -> tuple[int, int]:
    """(byte offset, newlines before it) of the k-th (0-based) non-whitespace byte of ``body``."""
    seen = -1
    for offset, byte in enumerate(body):
        if byte not in _WHITESPACE:
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


def _encode(bodies: list[bytes], table: bytes | None) -> tuple[np.ndarray, np.ndarray, list[bytes] | None]:
    """Translate record bodies (``table`` None: only delete whitespace): (codes uint8 [sum], lengths int64 [n],
    per-record parts, or None when they were not needed)."""
    joined = b"".join(bodies)
    encoded = joined.translate(table, _WHITESPACE)
    parts = None
    if len(encoded) == len(joined):  # no whitespace inside sequences: lengths are the body lengths
        lengths = np.fromiter(map(len, bodies), dtype=np.int64, count=len(bodies))
    else:
        parts = [b.translate(table, _WHITESPACE) for b in bodies]
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    return np.frombuffer(encoded, dtype=np.uint8), lengths, parts


DEFAULT_ALPHABET = Alphabet()  # the token store's ids


def parse_block(
    data: bytes,
    path: str,
    first_line: int = 1,
    on_invalid: str = "error",
    alphabet: Alphabet | None = DEFAULT_ALPHABET,
) -> ParsedBlock:
    """Parse and encode whole FASTA records (``data`` starts with '>').

    Residues are encoded with ``bytes.translate`` and ``residue_table(alphabet)`` (which also deletes whitespace);
    one terminal ``*`` per record is stripped and counted. ``alphabet=None`` only splits the records (``tokens``
    None, sequences unchecked: read them with ``ParsedBlock.sequence``). ``on_invalid="error"`` raises
    FastaFormatError naming file, line and id for a record with an invalid character, no sequence, or no id;
    ``"skip"`` drops such records, counts them and lists them in ``skipped``.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    table = None if alphabet is None else residue_table(alphabet)
    raw_headers, bodies, line_offsets = _records(data)
    tokens, lengths, parts = _encode(bodies, table)
    if (table is None or (len(tokens) and tokens.max() >= _STAR)) and any(b[:1] == b">" for b in bodies):
        # '>' in a "sequence" line: a record without sequence fooled the fast path; split properly
        raw_headers, bodies, line_offsets = _records(data, fast=False)
        tokens, lengths, parts = _encode(bodies, table)
    lines = line_offsets + first_line
    headers = [h.strip() for h in b"\n".join(raw_headers).decode("latin-1").split("\n")]
    columns = header_columns(headers)
    counters: Counter = Counter(records_read=len(bodies), cr_bytes=data.count(b"\r"))

    problems: dict[int, tuple[str, str, int]] = {}  # record -> (reason, detail, line)
    if table is not None and len(tokens) and tokens.max() >= _STAR:  # slow path: '*' or invalid characters
        if parts is None:
            parts = [b.translate(table, _WHITESPACE) for b in bodies]
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
            raise FastaFormatError(f"{path}:{line}: record {rec_id!r} {detail}; {_INVALID_HINT}")
        keep = np.ones(len(bodies), dtype=bool)
        for rec, (reason, _, line) in sorted(problems.items()):
            keep[rec] = False
            counters[f"skipped_{reason}"] += 1
            skipped.append((line, columns["accession"][rec] or "", reason))
        if table is not None:
            tokens = tokens[np.repeat(keep, lengths)]
        lengths, lines = lengths[keep], lines[keep]
        kept = keep.tolist()
        columns = {name: [v for v, k in zip(col, kept, strict=True) if k] for name, col in columns.items()}
        headers = [h for h, k in zip(headers, kept, strict=True) if k]
        bodies = [b for b, k in zip(bodies, kept, strict=True) if k]
    return ParsedBlock(headers, columns, lines, bodies, lengths, tokens if table is not None else None, counters,
                       skipped)


# ---------------------------------------------------------------------------------------------------
# 3. records
# ---------------------------------------------------------------------------------------------------
def read_fasta(path: str | Path, alphabet: Alphabet | None = None) -> Iterator[FastaRecord]:
    """Stream the records of a FASTA file (plain or gzip), a block at a time.

    Without ``alphabet`` each sequence is given as written (whitespace removed). With one, each is checked by
    the rules of the module docstring (a bad character raises an error naming file, line, id and residue) and
    given as the alphabet reads it: upper case, without the terminal ``*``. A token-list vocabulary with tags
    (``[HEAVY]``) is checked by its own ``encode`` instead (tags may stand inside a sequence) and its sequences
    are given as written. Raises :class:`FastaFormatError` for bad input (see the module docstring).
    """
    by_table = alphabet is not None and not alphabet.tags
    for block in iter_blocks(path):
        parsed = parse_block(block.data, block.path, block.first_line, alphabet=alphabet if by_table else None)
        for i, header in enumerate(parsed.headers):
            fields = {name: column[i] for name, column in parsed.fields.items() if column[i] is not None}
            rec_id, line, sequence = fields["accession"], int(parsed.lines[i]), parsed.sequence(i)
            if by_table:
                sequence = sequence.upper().removesuffix("*")
            elif alphabet is not None:
                try:
                    alphabet.encode(sequence, rec_id)
                except TokenizationError as err:
                    raise FastaFormatError(f"{block.path}:{line}: {err}") from None
            yield FastaRecord(rec_id, header, sequence, block.path, line, fields)


def load_fasta(path: str | Path, alphabet: Alphabet | None = None) -> list[FastaRecord]:
    """Read a whole FASTA file into a list, failing on duplicate ids (see :func:`read_fasta`)."""
    records = list(read_fasta(path, alphabet))
    check_unique_ids(path, [r.id for r in records], [r.line for r in records])
    return records


def read_sequences(
    path: str | Path, n: int | None = None, min_len: int = 30, max_len: int | None = None, seed: int = 0,
    too_short: list[str] | None = None,
) -> list[tuple[str, str]]:
    """(id, sequence) pairs from a FASTA file, checked and upper-cased by the default alphabet: those with
    ≥ ``min_len`` residues, longer ones cropped to ``max_len``; a random subset of ``n`` (fixed ``seed``) when
    ``n`` is given, in file order. The ids of the shorter ones are appended to ``too_short`` when given."""
    records = [(r.id, r.sequence) for r in read_fasta(path, DEFAULT_ALPHABET)]
    if too_short is not None:
        too_short.extend(i for i, s in records if len(s) < min_len)
    records = [(i, s[:max_len] if max_len else s) for i, s in records if len(s) >= min_len]
    if n is not None and n < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), n))
        records = [records[i] for i in keep]
    return records
