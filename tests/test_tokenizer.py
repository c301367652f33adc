import pytest
import torch

from proteinperformer.tokenizer import STANDARD_RESIDUES, Alphabet, TokenizationError

alphabet = Alphabet()


def test_token_ids_are_pinned():
    # Checkpoints and token stores depend on these ids: changing them is a breaking change.
    assert alphabet.all_toks[:5] == ["<pad>", "<cls>", "<eos>", "<unk>", "<mask>"]
    assert alphabet.encode("ACDY").tolist() == [5, 6, 7, 24]
    assert alphabet.encode("XBZUO").tolist() == [25, 26, 27, 28, 29]
    assert len(alphabet) == 32 and len(alphabet) % 8 == 0


def test_round_trip_all_letters_and_lowercase():
    seq = STANDARD_RESIDUES + "XBZUO"
    assert alphabet.decode(alphabet.encode(seq)) == seq
    assert alphabet.decode(alphabet.encode(seq.lower())) == seq


def test_terminal_stop_is_stripped_but_inner_stop_is_an_error():
    assert alphabet.decode(alphabet.encode("MKV*")) == "MKV"
    with pytest.raises(TokenizationError, match=r"'P1'.*'\*' at position 3"):
        alphabet.encode("MK*V", "P1")


@pytest.mark.parametrize("seq,pos,char", [("MK1V", 3, "1"), ("J", 1, "J"), ("MK V", 3, " "), ("MKé", 3, "é")])
def test_bad_characters_name_id_and_position(seq, pos, char):
    with pytest.raises(TokenizationError) as err:
        alphabet.encode(seq, "sp|Q1|X")
    assert "'sp|Q1|X'" in str(err.value) and f"position {pos}" in str(err.value) and repr(char) in str(err.value)


def test_batch_converter_pads_and_adds_specials():
    labels, seqs, tokens = alphabet.get_batch_converter()([("a", "MK"), ("b", "MKVL")])
    assert labels == ["a", "b"] and seqs == ["MK", "MKVL"]
    assert tokens.tolist() == [[1, 15, 13, 2, 0, 0], [1, 15, 13, 22, 14, 2]]
    assert alphabet.decode(tokens[1]) == "MKVL"


def test_batch_converter_truncates_to_max_len():
    _, _, tokens = alphabet.get_batch_converter(max_len=5)([("a", "MKVLAAA")])
    assert tokens.shape == (1, 5) and tokens[0, -1] == alphabet.eos_idx


def test_is_residue():
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 24, 25, 29, 30])
    assert alphabet.is_residue(tokens).tolist() == [False] * 5 + [True] * 4 + [False]
