import gzip

import pytest

from proteinperformer.data.fasta import FastaFormatError, load_fasta, parse_uniprot_header, read_fasta
from proteinperformer.tokenizer import Alphabet

from .conftest import SAMPLE_FASTA


def write(tmp_path, text, name="x.fasta", gz=False):
    path = tmp_path / (name + (".gz" if gz else ""))
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_uniprot_header_fields():
    f = parse_uniprot_header("sp|Q8AWH3|SX17A_XENTR Transcription factor Sox-17-alpha OS=Xenopus tropicalis "
                             "OX=8364 GN=sox17a PE=2 SV=1")
    assert f == {"db": "sp", "accession": "Q8AWH3", "entry_name": "SX17A_XENTR",
                 "description": "Transcription factor Sox-17-alpha", "OS": "Xenopus tropicalis", "OX": "8364",
                 "GN": "sox17a", "PE": "2", "SV": "1"}
    assert parse_uniprot_header("P21624 ontologies=MFO,CCO") == {"accession": "P21624",
                                                                 "description": "ontologies=MFO,CCO"}


def test_reads_bundled_sample():
    records = load_fasta(SAMPLE_FASTA, Alphabet())
    assert len(records) == 20000
    assert sum(len(r.sequence) for r in records) == 9_055_569  # as documented in shared/data/README.md
    assert records[0].fields["db"] == "tr" and records[0].line == 1


def test_multiline_gz_and_windows_line_endings(tmp_path):
    path = write(tmp_path, ">a desc\r\nMKV\r\nLL\r\n\r\n>b\r\nQQ\r\n", gz=True)
    recs = list(read_fasta(path))
    assert [(r.id, r.sequence, r.line) for r in recs] == [("a", "MKVLL", 1), ("b", "QQ", 5)]


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no FASTA records"),
        ("MKV\n>a\nMK\n", r"x.fasta:1: sequence data before the first '>'"),
        (">a\nMK\n>b\n>c\nMK\n", r"x.fasta:3: record 'b' has no sequence"),
        (">a\nMK\n> \nMK\n", r"x.fasta:3: record '<no id>' header '>' has no identifier"),
        (">a\nMK\n>b\nMK1\n", r"x.fasta:3: record 'b' invalid character '1' at residue 3 \(line 4\)"),
        (">a\nMK\n>b\nM\tK\n\nK*Q\n", r"x.fasta:3: record 'b' invalid character '\*' at residue 4 \(line 6\)"),
        (">a\nMK**\n", r"x.fasta:1: record 'a' invalid character '\*' at residue 3 \(line 2\)"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, text, message):
    with pytest.raises(FastaFormatError, match=message):
        list(read_fasta(write(tmp_path, text), Alphabet()))


def test_duplicate_ids(tmp_path):
    with pytest.raises(FastaFormatError, match=r"x.fasta:3: duplicate id 'a' \(first seen at .*x.fasta:1\); 2 dup"):
        load_fasta(write(tmp_path, ">a\nMK\n>a\nMK\n>b\nM\n>a\nQ\n"))


def test_truncated_gzip(tmp_path):
    full = gzip.compress(b"".join(b">s%d\nMKVLAAGG\n" % i for i in range(5000)))
    path = tmp_path / "t.fasta.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(FastaFormatError, match=r"t.fasta.gz:\d+: truncated or corrupt gzip stream"):
        list(read_fasta(path))


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FastaFormatError, match="no such file"):
        list(read_fasta(tmp_path / "nope.fasta"))
    with pytest.raises(FastaFormatError, match="is a directory"):
        list(read_fasta(tmp_path))
