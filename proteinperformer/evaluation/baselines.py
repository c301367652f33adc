"""Sequence-only features, the baselines every probe is scored against (no model involved).

The 21 residue classes are the 20 standard amino acids plus one for X/B/Z/U/O.
"""

from __future__ import annotations

import numpy as np

from proteinperformer.tokenizer import STANDARD_RESIDUES

N_AA = 21  # 20 standard residues + 1 for any rare/ambiguous letter
WINDOW = 7
TERMINAL = 30

_AA_INDEX = np.full(256, N_AA - 1, dtype=np.int64)
for _i, _aa in enumerate(STANDARD_RESIDUES):
    _AA_INDEX[ord(_aa)] = _i


def onehot(seq: str) -> np.ndarray:
    """One-hot residues: [L, 21] (20 standard amino acids, then one column for any other letter)."""
    idx = _AA_INDEX[np.frombuffer(seq.upper().encode("latin-1"), dtype=np.uint8)]
    return np.eye(N_AA, dtype=np.float32)[idx]


def window_onehot(seq: str, window: int = WINDOW) -> np.ndarray:
    """One-hot residues at offsets -window..+window of each position: [L, (2*window+1)*21]; zeros past
    the sequence ends."""
    x = np.pad(onehot(seq), ((window, window), (0, 0)))  # (L + 2w, 21)
    n = len(seq)
    return np.concatenate([x[k : k + n] for k in range(2 * window + 1)], axis=1)


def window_composition(seq: str, window: int = WINDOW) -> np.ndarray:
    """Amino-acid composition of the ±window neighbourhood of each residue (inside the sequence): [L, 21],
    rows sum to 1."""
    cum = np.concatenate([np.zeros((1, N_AA), np.float32), np.cumsum(onehot(seq), axis=0)])  # (L + 1, 21)
    n = len(seq)
    lo = np.clip(np.arange(n) - window, 0, n)
    hi = np.clip(np.arange(n) + window + 1, 0, n)
    counts = cum[hi] - cum[lo]
    return counts / counts.sum(1, keepdims=True)


def composition(seq: str) -> np.ndarray:
    """Amino-acid composition of a protein: [21] fractions summing to 1."""
    return onehot(seq).mean(0)


def terminal_onehot(seq: str, n: int = TERMINAL) -> np.ndarray:
    """One-hot of the first ``n`` and last ``n`` residues, zero-padded for short proteins: [2*n*21]."""
    x = onehot(seq)
    head = np.zeros((n, N_AA), np.float32)
    tail = np.zeros((n, N_AA), np.float32)
    head[: min(n, len(x))] = x[:n]
    tail[n - min(n, len(x)) :] = x[-n:]
    return np.concatenate([head, tail]).ravel()
