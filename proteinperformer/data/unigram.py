"""The unigram (amino-acid frequency) baseline: the one definition that training, ``pp-evaluate`` and ``pp-score``
report.

A unigram model predicts every residue from residue frequencies alone, without context. Its frequencies are
:func:`unigram_frequencies`: the counts of the alphabet's residue letters (``Alphabet.letters``, the 20 standard
amino acids and X B Z U O for this package's and ESM-2's alphabets: 25 letters) plus one each (add-one
smoothing), normalised over those letters. Its accuracy predicts the most frequent letter everywhere; its
perplexity is exp of the mean -log frequency of the residues scored (:func:`unigram_accuracy_perplexity`).

- Training validation, ``pp-train``'s summary and ``pp-evaluate``'s masked-residue table:
  :func:`unigram_baseline`, frequencies counted on the train split, scored on every residue of the evaluated split
  (valid or test); the paper reports 9.92% / 17.80 on TrEMBL.
- ``pp-score`` and the card's variant-effect section: the log-ratio log f(mt) − log f(wt)
  (``inference.score.unigram_scores``) of the same frequencies counted over every sequence of a FASTA file
  (:func:`fasta_unigram_frequencies`).

:func:`unigram_description` is the label every printed line and JSON record carries, so a number always says
which split it counted and which letters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from proteinperformer.data.fasta import read_fasta
from proteinperformer.tokenizer import Alphabet


class ResidueCounter(Protocol):
    """A split of tokenised sequences (``TokenizedSequences``, a token store's ``StoreSequences``)."""

    def residue_counts(self, vocab_size: int) -> np.ndarray: ...


def unigram_frequencies(counts: np.ndarray, alphabet: Alphabet) -> np.ndarray:
    """Add-one smoothed frequencies of the residue letters: float64 [len(alphabet)] indexed by token id, summing
    to 1 over ``alphabet.residue_ids`` and 0 at every other token.

    ``counts``: occurrences of each token id, int [≥ len(alphabet)] (``residue_counts(len(alphabet))``); counts of
    non-residue tokens are ignored.
    """
    ids = np.asarray(alphabet.residue_ids)
    freqs = np.zeros(len(alphabet), dtype=np.float64)
    freqs[ids] = np.asarray(counts, dtype=np.float64)[ids] + 1.0
    return freqs / freqs.sum()


def unigram_accuracy_perplexity(frequencies: np.ndarray, counts: np.ndarray,
                                alphabet: Alphabet) -> dict[str, float | int | str]:
    """Accuracy and perplexity of predicting residues from ``frequencies`` (:func:`unigram_frequencies`) on residues
    with these ``counts`` (int [≥ len(alphabet)], per token id; non-residue tokens are not scored).

    Returns ``{"accuracy": share equal to the most frequent letter, "perplexity": exp(mean -log f), "residues":
    number scored, "most_frequent": that letter}``. Raises ValueError when no residue is counted.
    """
    ids = np.asarray(alphabet.residue_ids)
    scored = np.asarray(counts, dtype=np.float64)[ids]
    n = scored.sum()
    if n == 0:
        raise ValueError("the unigram baseline has no residue to score (the evaluated split is empty)")
    best = int(np.argmax(frequencies[ids]))
    nll = -(scored * np.log(frequencies[ids])).sum() / n
    return {"accuracy": float(scored[best] / n), "perplexity": math.exp(nll), "residues": int(n),
            "most_frequent": alphabet.all_toks[int(ids[best])]}


def unigram_baseline(train: ResidueCounter, evaluated: ResidueCounter,
                     alphabet: Alphabet) -> dict[str, float | int | str]:
    """The unigram baseline of an evaluated split: frequencies counted on ``train``, scored on every residue of
    ``evaluated`` (see :func:`unigram_accuracy_perplexity` for the keys)."""
    freqs = unigram_frequencies(train.residue_counts(len(alphabet)), alphabet)
    return unigram_accuracy_perplexity(freqs, evaluated.residue_counts(len(alphabet)), alphabet)


def fasta_residue_counts(path: str | Path, alphabet: Alphabet) -> np.ndarray:
    """Occurrences of each token id over every sequence of a FASTA file: int64 [len(alphabet)]. A letter outside
    the alphabet fails naming the file, line and record."""
    counts = np.zeros(len(alphabet), dtype=np.int64)
    for record in read_fasta(path, alphabet):
        counts += np.bincount(alphabet.encode(record.sequence, record.id).numpy(), minlength=len(alphabet))
    return counts


def fasta_unigram_frequencies(path: str | Path, alphabet: Alphabet | None = None) -> dict[str, float]:
    """{letter: frequency} of :func:`unigram_frequencies` counted over every sequence of a FASTA file, for each of
    the residue letters of ``alphabet`` (default: this package's, 25 letters)."""
    alphabet = alphabet or Alphabet()
    freqs = unigram_frequencies(fasta_residue_counts(path, alphabet), alphabet)
    return {letter: float(freqs[alphabet.tok_to_idx[letter]]) for letter in alphabet.letters}


def unigram_description(alphabet: Alphabet, counted: str, scored: str | None = None) -> str:
    """The baseline's label: ``"train-split frequencies of 25 residue letters, on valid"`` for
    ``counted="train-split"``, ``scored="valid"``; without ``scored`` (a log-ratio) only what was counted."""
    text = f"{counted} frequencies of {len(alphabet.letters)} residue letters"
    return text if scored is None else f"{text}, on {scored}"
