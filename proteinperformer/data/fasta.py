"""FASTA reading (plain or gzip) with UniProt header parsing and errors that name file and line.

Why not ``Bio.SeqIO``: we need the line number of every record for error messages, and strict handling of
the malformed inputs real corpora contain (text before the first header, empty records, truncated gzip).
Biopython's parsers report neither line numbers nor empty records, so this small streaming reader
is written by hand; it holds one record in memory at a time.
"""

from __future__ import annotations

import gzip
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


_UNIPROT_ID = re.compile(r"^(sp|tr)\|([^|\s]+)\|(\S+)\s*(.*)$")
_UNIPROT_KEY = re.compile(r"\s(OS|OX|GN|PE|SV)=")


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


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="latin-1", newline=None)
    return open(path, encoding="latin-1", newline=None)


def read_fasta(path: str | Path, alphabet: Alphabet | None = None) -> Iterator[FastaRecord]:
    """Stream the records of a FASTA file (``.gz`` is decompressed on the fly).

    If ``alphabet`` is given each sequence is validated with it, so a bad character raises an error that
    names file, line and record id. Raises :class:`FastaFormatError` for a missing path, a directory,
    an empty file, text before the first header, a header without id, a record without sequence, or a
    truncated/corrupt gzip stream. Windows line endings are accepted.
    """
    path = Path(path)
    if not path.exists():
        raise FastaFormatError(f"{path}: no such file; give the path of a FASTA file (.fasta or .fasta.gz)")
    if path.is_dir():
        raise FastaFormatError(f"{path}: is a directory, not a FASTA file")

    def finish(header: str, header_line: int, chunks: list[str]) -> FastaRecord:
        sequence = "".join(chunks)
        fields = parse_uniprot_header(header)
        rec_id = fields["accession"]
        if not rec_id:
            raise FastaFormatError(f"{path}:{header_line}: header '>' has no identifier")
        if not sequence:
            raise FastaFormatError(
                f"{path}:{header_line}: record {rec_id!r} has no sequence; remove the record or add its residues"
            )
        if alphabet is not None:
            try:
                alphabet.encode(sequence, rec_id)
            except TokenizationError as err:
                raise FastaFormatError(f"{path}:{header_line}: {err}") from None
        return FastaRecord(rec_id, header, sequence, str(path), header_line, fields)

    header: str | None = None
    header_line = 0
    chunks: list[str] = []
    n_records = 0
    lineno = 0
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                if line.startswith(">"):
                    if header is not None:
                        yield finish(header, header_line, chunks)
                        n_records += 1
                    header, header_line, chunks = line[1:], lineno, []
                elif header is None:
                    raise FastaFormatError(
                        f"{path}:{lineno}: sequence data before the first '>' header; is this a FASTA file?"
                    )
                else:
                    chunks.append(line.replace(" ", ""))
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise FastaFormatError(
            f"{path}: unreadable or truncated gzip stream after line {lineno} ({err}); re-download the file"
        ) from None
    if header is not None:
        yield finish(header, header_line, chunks)
        n_records += 1
    if n_records == 0:
        raise FastaFormatError(f"{path}: no FASTA records found (empty file?)")


def load_fasta(path: str | Path, alphabet: Alphabet | None = None) -> list[FastaRecord]:
    """Read a whole FASTA file into a list, failing on duplicate ids (see :func:`read_fasta`)."""
    records = list(read_fasta(path, alphabet))
    seen: dict[str, int] = {}
    for rec in records:
        if rec.id in seen:
            raise FastaFormatError(
                f"{path}:{rec.line}: duplicate id {rec.id!r} (first seen at line {seen[rec.id]}); ids must be unique"
            )
        seen[rec.id] = rec.line
    return records


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
