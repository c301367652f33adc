"""FASTA -> token store: bad input (each either a counted normalisation or an error naming file, line, id),
equivalence with the in-memory route, and the 35k-residue case."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from proteinperformer.data.datasets import ConcatChunkDataset, SingleSequenceDataset
from proteinperformer.data.fasta import (
    FastaFormatError,
    header_columns,
    iter_blocks,
    load_fasta,
    parse_block,
    parse_uniprot_header,
)
from proteinperformer.data.store import StoreError, TokenStore, open_store
from proteinperformer.data.store.preprocess import preprocess
from proteinperformer.tokenizer import Alphabet

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "uniprot_sample20k.fasta.gz"
ALPHABET = Alphabet()


def write(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def run(tmp_path: Path, *inputs: Path, **kwargs) -> dict:
    return preprocess(list(inputs), tmp_path / "store", progress=False, **kwargs)


def all_sequences(store_path: Path) -> dict[str, str]:
    """accession -> decoded residues over all splits."""
    store = TokenStore(store_path)
    out = {}
    for split in store.split_names:
        seqs = store.split(split)
        for i, acc in enumerate(seqs.ids):
            out[acc] = ALPHABET.decode(seqs[i].tolist())
    return out


GOOD = ">A1 first\nMKV\nLLA\n>A2\nACDEFGHIKLMNPQRSTVWYXBZUO\n>A3 third one\nmk\n"


def test_roundtrip_multiline_lowercase_and_header_fields(tmp_path):
    fasta = write(tmp_path / "x.fasta", GOOD)
    manifest = run(tmp_path, fasta)
    assert manifest["counts"]["sequences_kept"] == 3
    assert all_sequences(tmp_path / "store") == {"A1": "MKVLLA", "A2": "ACDEFGHIKLMNPQRSTVWYXBZUO", "A3": "MK"}
    meta = TokenStore(tmp_path / "store").metadata().set_index("accession")
    assert meta.loc["A1", "description"] == "first" and meta.loc["A3", "line"] == 6
    assert meta.loc["A2", "length"] == 25


def test_same_tokens_as_alphabet_encode_on_real_sample(tmp_path):
    run(tmp_path, SAMPLE, chunk_mb=1)  # several shards
    store = TokenStore(tmp_path / "store")
    assert len(store.manifest["shards"]) > 3
    records = {r.id: r for r in load_fasta(SAMPLE)}
    seen = 0
    for split in ("train", "valid", "test"):
        seqs = store.split(split)
        for i in range(0, len(seqs), 37):
            expected = ALPHABET.encode(records[seqs.ids[i]].sequence).numpy()
            np.testing.assert_array_equal(seqs[i], expected)
            assert seqs[i].dtype == np.uint8 and seqs.lengths[i] == len(expected)
        seen += len(seqs)
    assert seen == len(records) == 20_000
    meta = store.metadata()
    first = records[meta["accession"].iloc[0]]
    fields = parse_uniprot_header(first.header)
    assert {k: meta.iloc[0][k] for k in fields} == fields
    assert meta.iloc[0]["line"] == first.line


@pytest.mark.parametrize("uniprot", [False, True])
def test_header_columns_match_parse_uniprot_header(uniprot):
    headers = ["P1 ontologies=MFO", "P2  two  spaces ", "x", "", "sp|bad"]
    if uniprot:
        headers.append("sp|Q8AWH3|SX17A_XENTR Sox OS=X tropicalis GN=sox PE=2 SV=1")
    columns = header_columns(headers)
    for i, h in enumerate(headers):
        expected = parse_uniprot_header(h)
        assert {k: columns[k][i] for k in columns if columns[k][i] is not None} == expected


def test_two_workers_give_the_same_store(tmp_path):
    one = preprocess([SAMPLE], tmp_path / "one", chunk_mb=1, progress=False)
    two = preprocess([SAMPLE], tmp_path / "two", chunk_mb=1, workers=2, progress=False)
    assert one["shards"] == two["shards"] and one["counts"] == two["counts"]


@pytest.mark.parametrize("chunk_mb", [0.00002, 1.0])
def test_block_reader_cuts_only_between_records(tmp_path, chunk_mb):
    fasta = write(tmp_path / "x.fasta.gz", "\n\n" + GOOD * 3)
    blocks = list(iter_blocks(fasta, int(chunk_mb * (1 << 20))))
    assert all(b.data.startswith(b">") for b in blocks)
    assert b"".join(b.data for b in blocks) == (GOOD * 3).encode()
    assert blocks[0].first_line == 3
    parsed = [parse_block(b.data, b.path, b.first_line) for b in blocks]
    assert sum(len(p.lengths) for p in parsed) == 9
    assert [int(x) for p in parsed for x in p.lines][:4] == [3, 6, 8, 10]


# ---- one reader: pp-preprocess and the in-memory route agree on awkward and bad files ----------------
AWKWARD = (">sp|P1|A_HUMAN Kinase OS=Homo sapiens\r\nmkv\r\nLLa*\r\n\r\n"
           ">P2 ambiguous letters\nACDEFGHIKLMNPQRSTVWYXBZUO\n>P3 spaces and tabs\n M K\tv \n\n>P4 stop codon\nwq\n*\n")
BAD = {
    "text_before_header": "\nMKV\n>A1\nMK\n",
    "no_id": ">A1\nMK\n>\nMK\n",
    "empty_record": ">A1\nMK\n>A2 empty\n\n>A3\nMK\n",
    "empty_one_line_records": ">A1\n>A2\nMK\n",
    "invalid_character": ">A1\nMK\n>A2\nMK\nVJ\n",
    "inner_star": ">A1\nMK*V\n",
    "two_stars": ">A1\nMKV**\n",
    "duplicate_ids": ">A1\nMK\n>A2\nMK\n>A1\nQQ\n>A2\nWW\n",
    "empty_file": "",
    "blank_file": "\n \n",
}


def _in_memory(path: Path) -> dict[str, np.ndarray]:
    from proteinperformer.data.sources import FastaSource

    seqs = FastaSource(path).sequences()
    return {seqs.ids[i]: np.asarray(seqs[i]) for i in range(len(seqs))}


def _stored(store_path: Path) -> dict[str, np.ndarray]:
    store = TokenStore(store_path)
    return {s.ids[i]: np.asarray(s[i]) for s in map(store.split, store.split_names) for i in range(len(s))}


def _error(call) -> str:
    with pytest.raises(FastaFormatError) as err:
        call()
    return str(err.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip-named-fasta", "plain"])
def test_awkward_file_gives_the_same_sequences_through_the_store_and_in_memory(tmp_path, gz):
    path = tmp_path.resolve() / "awkward.fasta"  # gzip under a plain name: recognised by its magic bytes
    path.write_bytes(gzip.compress(AWKWARD.encode()) if gz else AWKWARD.encode())
    manifest = preprocess([path], tmp_path / "store", progress=False)
    stored, in_memory = _stored(tmp_path / "store"), _in_memory(path)
    expected = {"P1": "MKVLLA", "P2": "ACDEFGHIKLMNPQRSTVWYXBZUO", "P3": "MKV", "P4": "WQ"}
    assert {k: ALPHABET.decode(v.tolist()) for k, v in stored.items()} == expected
    assert stored.keys() == in_memory.keys()
    for key, tokens in stored.items():
        np.testing.assert_array_equal(tokens, in_memory[key])
    assert manifest["counters"]["stop_codon_stripped"] == 2
    records = load_fasta(path, ALPHABET)  # record by record: the same residues, as the alphabet reads them
    assert {r.id: r.sequence for r in records} == expected and [r.line for r in records] == [1, 5, 7, 10]


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("gz", [True, False], ids=["gzip-named-fasta", "plain"])
def test_bad_file_gives_the_same_error_through_the_store_and_in_memory(tmp_path, name, gz):
    path = tmp_path.resolve() / f"{name}.fasta"
    path.write_bytes(gzip.compress(BAD[name].encode()) if gz else BAD[name].encode())
    message = _error(lambda: preprocess([path], tmp_path / "store", progress=False))
    assert message == _error(lambda: _in_memory(path))
    assert message.startswith(str(path)) and "\n" not in message  # one line naming the file (and line, id)


def test_unreadable_inputs_give_the_same_error_through_the_store_and_in_memory(tmp_path):
    data = gzip.compress("".join(f">A{i}\nMKVLAAGGWQ\n" for i in range(20000)).encode())
    truncated = tmp_path.resolve() / "truncated.fasta"
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.fasta").mkdir()
    for path in (truncated, tmp_path.resolve() / "folder.fasta", tmp_path.resolve() / "missing.fasta"):
        message = _error(lambda path=path: preprocess([path], tmp_path / "store", progress=False))
        assert message == _error(lambda path=path: _in_memory(path)) and message.startswith(str(path))


# ---- bad input -----------------------------------------------------------------------------------
def test_invalid_character_error_names_file_line_and_id(tmp_path):
    fasta = write(tmp_path / "bad.fasta", ">A1\nMKV\n>A2 x\nMK\nVJ\n>A3\nMK\n")
    with pytest.raises(
        FastaFormatError, match=r"bad\.fasta:3: record 'A2' invalid character 'J' at residue 4 \(line 5\)"
    ):
        run(tmp_path, fasta)
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(tmp_path / "store")


def test_invalid_character_skip_is_counted_and_listed(tmp_path):
    fasta = write(tmp_path / "bad.fasta", ">A1\nMKV\n>A2 x\nMK\nVJ\n>A3\nMK\n")
    manifest = run(tmp_path, fasta, on_invalid="skip")
    assert manifest["counters"]["skipped_invalid_character"] == 1
    assert manifest["counts"]["sequences_kept"] == 2 and manifest["counts"]["records_read"] == 3
    skipped = pd.read_parquet(tmp_path / "store" / "skipped.parquet")
    assert skipped[["line", "id", "reason"]].values.tolist() == [[3, "A2", "invalid_character"]]
    assert set(all_sequences(tmp_path / "store")) == {"A1", "A3"}


def test_empty_record(tmp_path):
    fasta = write(tmp_path / "e.fasta", ">A1\nMKV\n>A2 empty\n\n>A3\nMK\n")
    with pytest.raises(FastaFormatError, match=r"e\.fasta:3: record 'A2' has no sequence"):
        run(tmp_path, fasta)
    manifest = run(tmp_path, fasta, on_invalid="skip", overwrite=True)  # other parsing arguments: start over
    assert manifest["counters"]["skipped_empty"] == 1 and manifest["counts"]["sequences_kept"] == 2


def test_empty_records_in_a_one_line_per_record_file(tmp_path):
    fasta = write(tmp_path / "e.fasta", ">A1\n>A2\n>A3\nMK\n")  # pairs up as header/sequence lines at first sight
    with pytest.raises(FastaFormatError, match=r"e\.fasta:1: record 'A1' has no sequence"):
        run(tmp_path, fasta)
    manifest = run(tmp_path, fasta, on_invalid="skip", overwrite=True)
    assert manifest["counters"]["skipped_empty"] == 2 and all_sequences(tmp_path / "store") == {"A3": "MK"}


def test_header_without_id(tmp_path):
    fasta = write(tmp_path / "n.fasta", ">A1\nMKV\n>\nMKV\n")
    with pytest.raises(FastaFormatError, match=r"n\.fasta:3: record '<no id>' header '>' has no identifier"):
        run(tmp_path, fasta)
    manifest = run(tmp_path, fasta, on_invalid="skip", overwrite=True)
    assert manifest["counters"]["skipped_no_id"] == 1 and manifest["counts"]["sequences_kept"] == 1


def test_duplicate_accessions_error_or_first_kept(tmp_path):
    a = write(tmp_path / "a.fasta", ">A1\nMKV\n>A2\nMK\n")
    b = write(tmp_path / "b.fasta", ">A3\nMM\n>A1\nWW\n")
    with pytest.raises(FastaFormatError, match=r"b\.fasta:3: duplicate id 'A1' \(first seen at .*a\.fasta:1\)"):
        run(tmp_path, a, b)
    manifest = run(tmp_path, a, b, on_duplicate_id="skip")
    assert manifest["counters"]["duplicate_id"] == 1 and manifest["counts"]["sequences_kept"] == 3
    assert all_sequences(tmp_path / "store")["A1"] == "MKV"
    meta = TokenStore(tmp_path / "store").metadata()
    assert meta["status"].tolist().count("duplicate_id") == 1


@pytest.mark.parametrize("text", [GOOD, GOOD.replace("MKV\nLLA", "MKVLLA")])  # wrapped / one line per sequence
def test_windows_line_endings_are_normalised_and_counted(tmp_path, text):
    crlf = write(tmp_path / "w.fasta", text.replace("\n", "\r\n"))
    manifest = run(tmp_path, crlf)
    assert manifest["counters"]["cr_bytes"] == text.count("\n")
    assert all_sequences(tmp_path / "store") == {"A1": "MKVLLA", "A2": "ACDEFGHIKLMNPQRSTVWYXBZUO", "A3": "MK"}
    meta = TokenStore(tmp_path / "store").metadata()
    assert meta["description"].tolist()[0] == "first"  # no trailing '\r'


def test_terminal_stop_codon_stripped_and_counted_inner_star_rejected(tmp_path):
    fasta = write(tmp_path / "s.fasta", ">A1\nMKV*\n>A2\nMK\n")
    manifest = run(tmp_path, fasta)
    assert manifest["counters"]["stop_codon_stripped"] == 1
    assert all_sequences(tmp_path / "store")["A1"] == "MKV"
    inner = write(tmp_path / "i.fasta", ">A1\nMK*V\n")
    with pytest.raises(FastaFormatError, match=r"i\.fasta:1: record 'A1' invalid character '\*' at residue 3"):
        preprocess([inner], tmp_path / "other", progress=False)


def test_truncated_gz_member_is_an_error_and_leaves_no_store(tmp_path):
    data = gzip.compress((">A1\n" + "MKV" * 20000 + "\n").encode() * 20)
    path = tmp_path / "t.fasta.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastaFormatError, match=r"t\.fasta\.gz:\d+: truncated or corrupt gzip stream"):
        run(tmp_path, path)
    assert not (tmp_path / "store" / "manifest.json").exists()
    with pytest.raises(StoreError, match="incomplete"):
        TokenStore(tmp_path / "store")


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dir.fasta").mkdir()
    with pytest.raises(FastaFormatError, match=r"dir\.fasta: is a directory"):
        run(tmp_path, tmp_path / "dir.fasta")
    assert not (tmp_path / "store").exists()


def test_missing_file(tmp_path):
    with pytest.raises(FastaFormatError, match=r"nope\.fasta: no such file"):
        run(tmp_path, tmp_path / "nope.fasta")


@pytest.mark.parametrize("name", ["empty.fasta", "empty.fasta.gz", "blank.fasta"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path / name, "\n\n" if name.startswith("blank") else "")
    with pytest.raises(FastaFormatError, match=rf"{name.replace('.', '[.]')}: no FASTA records found"):
        run(tmp_path, path)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_text_before_first_header(tmp_path):
    path = write(tmp_path / "x.fasta", "\nMKV\n>A1\nMK\n")
    with pytest.raises(FastaFormatError, match=r"x\.fasta:2: sequence data before the first '>' header"):
        run(tmp_path, path)


def test_sequence_longer_than_max_len_and_longer_than_a_block(tmp_path):
    rng = np.random.default_rng(0)
    long = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 35_213))
    wrapped = "\n".join(long[i : i + 60] for i in range(0, len(long), 60))
    fasta = write(tmp_path / "long.fasta.gz", f">S1\nMKV\n>L1 long\n{wrapped}\n>S2\nMK\n")
    manifest = run(tmp_path, fasta, chunk_mb=0.01)  # the record spans several read blocks
    assert manifest["counts"]["longer_than_1022"] == 1
    store = TokenStore(tmp_path / "store")
    everything = all_sequences(tmp_path / "store")
    assert everything["L1"] == long
    split = next(s for s in store.split_names if "L1" in store.split(s).ids)
    seqs = store.split(split)
    i = seqs.ids.index("L1")
    single = SingleSequenceDataset(seqs, ALPHABET, max_len=1024, seed=0)
    item = single[(0, i)]
    assert len(item["tokens"]) == 1024
    window = ALPHABET.decode(item["tokens"][1:-1].tolist())
    assert window in long
    concat = ConcatChunkDataset(seqs, ALPHABET, chunk_len=8192)
    stream = np.concatenate([concat[j]["tokens"].numpy() for j in range(len(concat))])
    assert (stream[stream != ALPHABET.padding_idx] >= 5).sum() == seqs.lengths.sum()


def test_manifest_is_written_last_and_lists_checksums(tmp_path):
    run(tmp_path, write(tmp_path / "x.fasta", GOOD))
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert {"tokens.npy", "offsets.npy"} <= set(manifest["shards"][0]["checksums"])
    assert manifest["alphabet"] == ALPHABET.all_toks
    TokenStore(tmp_path / "store").verify()
