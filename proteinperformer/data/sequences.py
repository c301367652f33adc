"""Tokenised sequences held as one flat uint8 array plus offsets.

This is the layout both the in-memory FASTA route and the on-disk token store use: sequence ``i`` is
``tokens[offsets[i]:offsets[i + 1]]`` (residue ids only, no special tokens). A flat array keeps
millions of sequences in a few bytes per residue and lets the on-disk version be a numpy memmap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from proteinperformer.data.fasta import FastaRecord
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
