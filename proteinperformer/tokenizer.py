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

``Alphabet([...tokens...])`` is a per-residue vocabulary given as its token list in id order, as read from a
Hugging Face ``vocab.txt`` (GPT-2 imports such as IgLM: ``[PAD] [UNK] [CLS] [SEP] [MASK]``, the residues, then
conditioning tokens ``[HEAVY] [HUMAN] ...``). Its special roles are found by name (``[PAD]``/``<pad>`` ...,
``[SEP]``/``</s>`` as the end token), its residues are its one-letter tokens, and its other multi-character
tokens are *tags* that may be written inside a sequence: ``"[HEAVY][HUMAN]EVQLVESGG"``. The model's checkpoint
carries the list, so the ids stay the source's.
"""

from __future__ import annotations

import re
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
# the spellings of each special role in a token-list vocabulary (ESM / fairseq, BERT / Hugging Face)
SPECIAL_ROLES = {"padding": ("<pad>", "[PAD]"), "cls": ("<cls>", "[CLS]", "<s>"), "eos": ("<eos>", "[SEP]", "</s>"),
                 "unk": ("<unk>", "[UNK]"), "mask": ("<mask>", "[MASK]")}
TAG = re.compile(r"(\[[^\[\]]*\]|<[^<>]*>)")  # a multi-character token written inside a sequence


class TokenizationError(ValueError):
    """A sequence holds a character that is not an amino-acid letter."""


class Alphabet:
    """The protein vocabulary: 20 standard residues, X/B/Z/U/O, and special tokens.

    Encoding accepts lower case and strips one terminal ``*`` (stop codon marker in translated FASTA);
    any other character raises :class:`TokenizationError` naming the sequence id and position.

    Args:
        name: "proteinperformer" (this project's ids, the default) or "esm" (ESM-2's ids), see ``ALPHABETS``;
            or a per-residue vocabulary as its list of tokens in id order (see the module docstring).
    """

    def __init__(self, name: str | Sequence[str] = "proteinperformer") -> None:
        if isinstance(name, str):
            if name not in ALPHABETS:
                raise ValueError(f"unknown alphabet {name!r}; choose from {sorted(ALPHABETS)} or give a token list")
            self.name, self.all_toks = name, list(ALPHABETS[name])
        else:
            self.name, self.all_toks = "vocab", [str(t) for t in name]
        self.tok_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.all_toks)}
        if len(self.tok_to_idx) != len(self.all_toks):
            twice = sorted({t for t in self.all_toks if self.all_toks.count(t) > 1})
            raise ValueError(f"vocabulary has duplicate tokens: {twice}")
        roles = {role: next((self.tok_to_idx[t] for t in names if t in self.tok_to_idx), None)
                 for role, names in SPECIAL_ROLES.items()}
        if missing := [f"{role} ({' or '.join(SPECIAL_ROLES[role])})" for role, i in roles.items() if i is None]:
            raise ValueError(f"vocabulary lacks the special tokens {', '.join(missing)}")
        self.padding_idx, self.cls_idx, self.eos_idx = roles["padding"], roles["cls"], roles["eos"]
        self.unk_idx, self.mask_idx = roles["unk"], roles["mask"]
        letters = [aa for aa in STANDARD_RESIDUES + RARE_RESIDUES if aa in self.tok_to_idx]
        if lacking := [aa for aa in STANDARD_RESIDUES if aa not in self.tok_to_idx]:
            raise ValueError(f"vocabulary lacks the residues {''.join(lacking)}")
        self.letters = "".join(letters)
        self.standard_ids = [self.tok_to_idx[aa] for aa in STANDARD_RESIDUES]
        self.residue_ids = [self.tok_to_idx[aa] for aa in letters]
        # tags: tokens that may be written inside a sequence (token-list vocabularies only, e.g. "[HEAVY]")
        specials = set(roles.values())
        self.tags: dict[str, int] = {} if self.name in ALPHABETS else {
            t: i for t, i in self.tok_to_idx.items() if len(t) > 1 and i not in specials}
        self._residue_table = torch.zeros(len(self.all_toks), dtype=torch.bool)
        self._residue_table[self.residue_ids] = True
        # Byte -> id lookup table (256 entries, -1 = invalid), so encoding is one vectorised gather.
        table = torch.full((256,), -1, dtype=torch.int64)
        for aa in letters:
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

        With a token-list vocabulary, its tags may appear in the string (``"[HEAVY][HUMAN]EVQL"``).
        Raises TokenizationError naming ``seq_id`` and the 1-based position of the first bad character.
        """
        if sequence.endswith("*"):
            sequence = sequence[:-1]
        if self.tags and TAG.search(sequence):
            return self._encode_tagged(sequence, seq_id)
        raw = sequence.encode("latin-1", errors="replace")
        ids = self._byte_table[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()] if raw else (
            torch.empty(0, dtype=torch.int64)
        )
        bad = (ids < 0).nonzero()
        if len(bad):
            self._refuse(sequence, int(bad[0]), seq_id)
        return ids

    def _refuse(self, sequence: str, pos: int, seq_id: str) -> None:
        tags = f", the tags {' '.join(self.tags)}" if self.tags else ""
        raise TokenizationError(
            f"sequence {seq_id!r}: invalid character {sequence[pos]!r} at position "
            f"{pos + 1}; allowed are the amino-acid letters {self.letters} (upper or lower case){tags} and one "
            "terminal '*'"
        )

    def _encode_tagged(self, sequence: str, seq_id: str) -> torch.Tensor:
        ids: list[int] = []
        pos = 0
        for piece in TAG.split(sequence):
            if piece in self.tags:
                ids.append(self.tags[piece])
            elif TAG.fullmatch(piece):
                raise TokenizationError(f"sequence {seq_id!r}: unknown tag {piece!r} at position {pos + 1}; this "
                                        f"vocabulary's tags are {' '.join(self.tags)}")
            else:
                for i, c in enumerate(piece):
                    code = int(self._byte_table[ord(c)]) if ord(c) < 256 else -1
                    if code < 0:
                        self._refuse(sequence, pos + i, seq_id)
                    ids.append(code)
            pos += len(piece)
        return torch.tensor(ids, dtype=torch.int64)

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
