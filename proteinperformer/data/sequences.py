"""Tokenised sequences held as one flat uint8 array plus offsets.

This is the layout both the in-memory FASTA route and the on-disk token store use: sequence ``i`` is
``tokens[offsets[i]:offsets[i + 1]]`` (residue ids only, no special tokens). A flat array keeps
millions of sequences in a few bytes per residue and lets the on-disk version be a numpy memmap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from proteinperformer.data.fasta import FastaRecord, check_unique_ids, iter_blocks, parse_block, read_fasta
from proteinperformer.tokenizer import Alphabet


class TokenizedSequences:
    """Read-only collection of tokenised sequences: ``len()``, ``[i]`` -> uint8 array, ``lengths``, ``ids``."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, ids: Sequence[str]) -> None:
        if len(offsets) != len(ids) + 1:
            raise ValueError(f"offsets has {len(offsets)} entries for {len(ids)} ids; expected len(ids) + 1")
        self.tokens = tokens
        self.offsets = offsets
        self.ids = list(ids)
        self.lengths = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def residue_counts(self, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
        """Occurrences of each token id over all residues, int64 [vocab_size] (bincount in bounded chunks:
        it widens its input to int64)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for lo in range(0, len(self.tokens), chunk):
            counts += np.bincount(self.tokens[lo : lo + chunk], minlength=vocab_size)[:vocab_size]
        return counts

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedSequences:
        """A copy holding only ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.uint8)
        for j, i in enumerate(indices):
            tokens[offsets[j] : offsets[j + 1]] = self[int(i)]
        return TokenizedSequences(tokens, offsets, [self.ids[int(i)] for i in indices])

    def head(self, n: int) -> TokenizedSequences:
        """The first ``n`` sequences (views of this collection's arrays, nothing copied)."""
        n = min(n, len(self))
        return TokenizedSequences(self.tokens[: self.offsets[n]], self.offsets[: n + 1], self.ids[:n])

    @classmethod
    def from_fasta(cls, path: str | Path, alphabet: Alphabet) -> TokenizedSequences:
        """Every record of a FASTA file, tokenised by the FASTA reader (``fasta.parse_block``: the rules and
        error messages of ``pp-preprocess``); duplicate ids are refused. Holds the file's residues as one uint8
        array (one per block while reading) and its ids; no object per sequence beyond its id string."""
        if alphabet.tags:  # a vocabulary with tags ([HEAVY]) is encoded by its own tokenizer, record by record
            records = list(read_fasta(path, alphabet))
            check_unique_ids(path, [r.id for r in records], [r.line for r in records])
            return cls.from_records(records, alphabet)
        tokens, lengths, lines, ids = [], [], [], []
        for block in iter_blocks(path):
            parsed = parse_block(block.data, block.path, block.first_line, alphabet=alphabet)
            tokens.append(parsed.tokens)
            lengths.append(parsed.lengths)
            lines.append(parsed.lines)
            ids.extend(parsed.ids)
        check_unique_ids(path, ids, np.concatenate(lines).tolist())
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return cls(np.concatenate(tokens), offsets, ids)

    @classmethod
    def from_records(cls, records: Iterable[FastaRecord], alphabet: Alphabet) -> TokenizedSequences:
        """Tokenise FASTA records (errors name the record id and position)."""
        ids, arrays = [], []
        for rec in records:
            ids.append(rec.id)
            arrays.append(alphabet.encode(rec.sequence, rec.id).numpy().astype(np.uint8))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint8)
        return cls(tokens, offsets, ids)
