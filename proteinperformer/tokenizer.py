"""Amino-acid alphabet: tokens, special indices, encode/decode and the matching batch converter.

Follows the shape of ESM's ``esm.data.Alphabet`` / ``BatchConverter``: one small object holds the
vocabulary and hands out the collator that matches it, so the two cannot drift apart.

Token ids (stable: checkpoints and token stores depend on them)::

    0 <pad>  1 <cls>  2 <eos>  3 <unk>  4 <mask>
    5..24   the 20 standard residues  A C D E F G H I K L M N P Q R S T V W Y
    25..29  rare / ambiguous residues X B Z U O
    30, 31  <null_0>, <null_1>  (never produced; pad the vocabulary to a multiple of 8 as ESM does)

``<cls>`` starts every sequence (its hidden state is the "bos" representation) and ``<eos>`` ends it;
in concatenated mode ``<eos>`` is the separator between sequences.

``Alphabet("esm")`` is ESM-2's vocabulary (fair-esm ``Alphabet.from_architecture("ESM-1b")``, 33 tokens,
``<cls>`` 0, ``<pad>`` 1, ``<eos>`` 2, ``<unk>`` 3, residues L A G V ... from 4, ``<mask>`` 32) with the same
``<cls> ... <eos>`` framing; models imported from ESM-2 carry it (``ModelConfig.alphabet``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
RARE_RESIDUES = "XBZUO"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eos>", "<unk>", "<mask>")
NULL_TOKENS = ("<null_0>", "<null_1>")
# ESM-2's vocabulary in id order (fair-esm esm/constants.py proteinseq_toks with the ESM-1b specials)
ESM_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
ALPHABETS = {
    "proteinperformer": (*SPECIAL_TOKENS, *STANDARD_RESIDUES, *RARE_RESIDUES, *NULL_TOKENS),
    "esm": ESM_TOKENS,
}


class TokenizationError(ValueError):
    """A sequence holds a character that is not an amino-acid letter."""


class Alphabet:
    """The protein vocabulary: 20 standard residues, X/B/Z/U/O, and special tokens.

    Encoding accepts lower case and strips one terminal ``*`` (stop codon marker in translated FASTA);
    any other character raises :class:`TokenizationError` naming the sequence id and position.

    Args:
        name: "proteinperformer" (this project's ids, the default) or "esm" (ESM-2's ids); see ``ALPHABETS``.
    """

    def __init__(self, name: str = "proteinperformer") -> None:
        if name not in ALPHABETS:
            raise ValueError(f"unknown alphabet {name!r}; choose from {sorted(ALPHABETS)}")
        self.name = name
        self.all_toks: list[str] = list(ALPHABETS[name])
        self.tok_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.all_toks)}
        self.padding_idx = self.tok_to_idx["<pad>"]
        self.cls_idx = self.tok_to_idx["<cls>"]
        self.eos_idx = self.tok_to_idx["<eos>"]
        self.unk_idx = self.tok_to_idx["<unk>"]
        self.mask_idx = self.tok_to_idx["<mask>"]
        self.standard_ids = [self.tok_to_idx[aa] for aa in STANDARD_RESIDUES]
        self.residue_ids = [self.tok_to_idx[aa] for aa in STANDARD_RESIDUES + RARE_RESIDUES]
        self._residue_table = torch.zeros(len(self.all_toks), dtype=torch.bool)
        self._residue_table[self.residue_ids] = True
        # Byte -> id lookup table (256 entries, -1 = invalid), so encoding is one vectorised gather.
        table = torch.full((256,), -1, dtype=torch.int64)
        for aa in STANDARD_RESIDUES + RARE_RESIDUES:
            table[ord(aa)] = self.tok_to_idx[aa]
            table[ord(aa.lower())] = self.tok_to_idx[aa]
        self._byte_table = table

    def __len__(self) -> int:
        return len(self.all_toks)

    def is_residue(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of residue tokens (standard or rare), same shape as ``tokens``."""
        return self._residue_table.to(tokens.device)[tokens]

    def encode(self, sequence: str, seq_id: str = "<sequence>") -> torch.Tensor:
        """Residue string -> LongTensor [len] of residue ids (no special tokens added).

        Raises TokenizationError naming ``seq_id`` and the 1-based position of the first bad character.
        """
        if sequence.endswith("*"):
            sequence = sequence[:-1]
        raw = sequence.encode("latin-1", errors="replace")
        ids = self._byte_table[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()] if raw else (
            torch.empty(0, dtype=torch.int64)
        )
        bad = (ids < 0).nonzero()
        if len(bad):
            pos = int(bad[0])
            raise TokenizationError(
                f"sequence {seq_id!r}: invalid character {sequence[pos]!r} at position {pos + 1}; "
                f"allowed are the amino-acid letters {STANDARD_RESIDUES + RARE_RESIDUES} "
                "(upper or lower case) and one terminal '*'"
            )
        return ids

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Token ids -> string; special tokens are dropped unless ``keep_special``."""
        out = []
        for i in ids:
            tok = self.all_toks[int(i)]
            if len(tok) == 1 or keep_special:
                out.append(tok)
        return "".join(out)

    def get_batch_converter(self, max_len: int | None = None) -> BatchConverter:
        """The collator that matches this alphabet (see :class:`BatchConverter`)."""
        return BatchConverter(self, max_len)


class BatchConverter:
    """Callable: list of (label, sequence) -> (labels, sequences, tokens [B, T]).

    Each row is ``<cls> residues <eos>`` right-padded with ``<pad>``. ``max_len`` (in tokens, specials
    included) truncates long sequences at the end, like ESM's ``truncation_seq_length``; None = no cap.
    """

    def __init__(self, alphabet: Alphabet, max_len: int | None = None) -> None:
        self.alphabet = alphabet
        self.max_len = max_len

    def __call__(self, batch: Sequence[tuple[str, str]]) -> tuple[list[str], list[str], torch.Tensor]:
        labels = [label for label, _ in batch]
        seqs = [seq for _, seq in batch]
        encoded = [self.alphabet.encode(seq, label) for label, seq in batch]
        if self.max_len is not None:
            encoded = [e[: self.max_len - 2] for e in encoded]
        width = max((len(e) for e in encoded), default=0) + 2
        tokens = torch.full((len(batch), width), self.alphabet.padding_idx, dtype=torch.int64)
        for row, ids in enumerate(encoded):
            tokens[row, 0] = self.alphabet.cls_idx
            tokens[row, 1 : len(ids) + 1] = ids
            tokens[row, len(ids) + 1] = self.alphabet.eos_idx
        return labels, seqs, tokens
