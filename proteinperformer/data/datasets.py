"""Datasets over tokenised sequences: single sequences (random crop), concatenated fixed-size chunks, and the
windows of whole proteins that packed batches hold (``packing.py``).

Randomness (crop offsets, and the MLM masks chosen by the collator) is a pure function of
``(seed, epoch, index)``: the sampler hands every index out together with its epoch, so a run that is
resumed, re-sharded across ranks, or loaded with any number of workers sees exactly the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from proteinperformer.data.permutation import Permutation
from proteinperformer.data.resume import ResumableSampler
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.tokenizer import Alphabet


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example in one epoch (SplitMix-style hash, stable across processes)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) % 2**64
    x ^= x >> 27
    return x % 2**63


def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    return (key[0], key[1]) if isinstance(key, tuple) else (0, int(key))


class SingleSequenceDataset(Dataset):
    """One example per sequence: ``<cls> residues <eos>``, randomly cropped to ``max_len`` tokens.

    A protein longer than ``max_len - 2`` residues is cropped as the framed sequence ``<cls> residues <eos>``
    is: a window of ``max_len`` tokens whose start is drawn from ``(seed, epoch, index)`` (``random_crop=False``:
    always the first window, used for evaluation). So ``<cls>`` appears only when the window holds the real
    N-terminus and ``<eos>`` only when it holds the real C-terminus: a crop never teaches a CLM to stop, or
    an MLM that a protein starts, at the crop boundary.
    Index with an int (epoch 0) or an ``(epoch, index)`` pair as :class:`EpochShuffleSampler` yields.
    Items are dicts: ``tokens`` LongTensor [T ≤ max_len] and ``seed`` (int, for the collator's masking).
    """

    def __init__(
        self,
        sequences: TokenizedSequences,
        alphabet: Alphabet,
        max_len: int = 1024,
        seed: int = 0,
        random_crop: bool = True,
    ) -> None:
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (cls + 1 residue + eos), got {max_len}")
        self.sequences = sequences
        self.alphabet = alphabet
        self.max_len = max_len
        self.seed = seed
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.sequences)

    def num_tokens(self, index: int) -> int:
        """Length in tokens of item ``index`` (for token-budget batching)."""
        return min(int(self.sequences.lengths[index]) + 2, self.max_len)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = _split_key(key)
        residues = self.sequences[index]
        seed = example_seed(self.seed, epoch, index)
        framed = len(residues) + 2  # <cls> residues <eos>
        start = 0  # window [start, start + width) over the framed sequence
        if framed > self.max_len and self.random_crop:
            start = int(np.random.default_rng(seed).integers(0, framed - self.max_len + 1))
        width = min(framed, self.max_len)
        tokens = torch.empty(width, dtype=torch.int64)
        first = max(start - 1, 0)  # residue at the first non-<cls> slot
        body = residues[first : first + width - (start == 0) - (start + width == framed)]
        tokens[int(start == 0) : int(start == 0) + len(body)] = torch.from_numpy(body.astype(np.int64))
        if start == 0:
            tokens[0] = self.alphabet.cls_idx  # the window holds the real N-terminus
        if start + width == framed:
            tokens[-1] = self.alphabet.eos_idx  # ... and the real C-terminus
        return {"tokens": tokens, "seed": seed}


class ConcatChunkDataset(Dataset):
    """Sequences joined by ``<eos>`` into one stream and cut into fixed ``chunk_len``-token chunks.

    This is the paper's "concatenated" mode (8192-token chunks). The sequence order in the stream is a
    fixed pseudo-random permutation drawn from ``seed`` (inputs such as the Swiss-Prot corpus are sorted,
    which would put near-duplicates side by side). Every residue of every sequence appears in exactly one
    chunk; the last chunk is right-padded with ``<pad>``. Items: ``tokens`` LongTensor [chunk_len], ``seed``.

    Index memory: the permutation is computed, not stored (``permutation.Permutation``), and the stream
    start of only every ``STRIDE``-th sequence is kept (8 / STRIDE bytes per sequence); a chunk walks at most
    ``STRIDE`` lengths forward from the nearest kept start.
    """

    STRIDE = 64

    def __init__(
        self, sequences: TokenizedSequences, alphabet: Alphabet, chunk_len: int = 8192, seed: int = 0
    ) -> None:
        self.sequences = sequences
        self.alphabet = alphabet
        self.chunk_len = chunk_len
        self.seed = seed
        n = len(sequences)
        self.order = Permutation(n, seed)
        # starts[m] = stream position of the (m * STRIDE)-th sequence in stream order (+1 per <eos>);
        # computed in chunks of whole strides so only the kept starts are ever held
        self.starts = np.zeros(math.ceil(n / self.STRIDE) + 1, dtype=np.int64)
        total, m, step = 0, 0, self.STRIDE * 4096
        for lo in range(0, n, step):
            spans = np.asarray(sequences.lengths[self.order[np.arange(lo, min(n, lo + step))]], dtype=np.int64) + 1
            ends = np.cumsum(spans) + total
            kept = np.concatenate([[total], ends[self.STRIDE - 1 :: self.STRIDE]])
            kept = kept[: len(self.starts) - m]
            self.starts[m : m + len(kept)] = kept
            m += len(kept) - 1
            total = int(ends[-1])
        self.starts[-1] = total
        self.total = total

    def __len__(self) -> int:
        return math.ceil(self.total / self.chunk_len)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = _split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} out of range ({len(self)} chunks)")
        lo, hi = index * self.chunk_len, (index + 1) * self.chunk_len
        tokens = np.full(self.chunk_len, self.alphabet.padding_idx, dtype=np.int64)
        m = min(int(np.searchsorted(self.starts, lo, side="right")) - 1, len(self.starts) - 2)
        j, s = m * self.STRIDE, int(self.starts[m])
        n = len(self.sequences)
        while j < n and s < hi:
            seq = np.append(self.sequences[int(self.order[j])], self.alphabet.eos_idx)
            a, b = max(lo, s), min(hi, s + len(seq))
            if a < b:
                tokens[a - lo : b - lo] = seq[a - s : b - s]
            s += len(seq)
            j += 1
        return {"tokens": torch.from_numpy(tokens), "seed": example_seed(self.seed, epoch, index)}


WINDOW_BITS = 24  # a sampler key is index << WINDOW_BITS | window (a protein has < 16M windows)


def window_key(index: int | np.ndarray, window: int | np.ndarray):
    """The one int (or int64 array) naming window ``window`` of protein ``index`` (see :func:`split_key`)."""
    return (np.asarray(index, dtype=np.int64) << WINDOW_BITS) | np.asarray(window, dtype=np.int64)


def split_key(key: int) -> tuple[int, int]:
    """(protein index, window) of a :func:`window_key`."""
    return key >> WINDOW_BITS, key & ((1 << WINDOW_BITS) - 1)


def window_counts(framed: np.ndarray, max_len: int | None) -> np.ndarray:
    """Windows of each framed protein (``length + 2`` tokens): ceil(framed / max_len), 1 without a crop."""
    framed = np.asarray(framed, dtype=np.int64)
    return np.ones_like(framed) if max_len is None else -(-framed // max_len)


def window_bounds(framed: int, windows: int, window: int) -> tuple[int, int]:
    """[start, end) of window ``window`` of ``windows`` equal windows over ``framed`` tokens."""
    return window * framed // windows, (window + 1) * framed // windows


class ProteinWindows(Dataset):
    """Windows of framed proteins: ``<cls> residues <eos>`` cut into equal windows of at most ``max_len`` tokens.

    Index with ``(epoch, window_key(index, window))`` as ``packing.PackedBatchSampler`` yields. Items: ``tokens``
    LongTensor [≤ max_len] and ``seed`` (the collator's masking), a function of (seed, epoch, index, window).
    ``max_len=None``: whole proteins (one window each).
    """

    def __init__(self, sequences, alphabet: Alphabet, max_len: int | None, seed: int = 0) -> None:
        if max_len is not None and max_len < 3:
            raise ValueError(f"data.max_len must be at least 3 (cls + 1 residue + eos), got {max_len}")
        self.sequences, self.alphabet, self.max_len, self.seed = sequences, alphabet, max_len, seed

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, code = key
        index, window = split_key(int(code))
        residues = self.sequences[index]
        framed = len(residues) + 2
        a, b = window_bounds(framed, int(window_counts(framed, self.max_len)), window)
        tokens = torch.empty(framed, dtype=torch.int64)
        tokens[0], tokens[-1] = self.alphabet.cls_idx, self.alphabet.eos_idx
        tokens[1:-1] = torch.from_numpy(residues.astype(np.int64))
        seed = example_seed(self.seed, epoch, index) ^ window
        return {"tokens": tokens[a:b].clone(), "seed": seed}


class EpochShuffleSampler(ResumableSampler, Sampler):
    """Yields ``(epoch, index)`` pairs: a fresh permutation per epoch from ``(seed, epoch)``, sharded by rank.

    Each of ``world_size`` ranks takes every ``world_size``-th index of the permutation (after padding
    the permutation by wrapping, as ``DistributedSampler`` does, unless ``drop_last``), so ranks see
    disjoint data and the same number of batches. ``start`` skips the first items of the epoch on this
    rank (used to resume mid-epoch). ``follow_epoch=False`` pins the epoch at 0 for evaluation: Lightning
    calls ``set_epoch`` on validation samplers too, and the epoch seeds every example's crop and masks, so
    without the pin each epoch (and the final ``validate`` after fit) would score different masked residues.
    ``items_per_batch``: the DataLoader's batch size, for the resume state (``state_dict``: epoch and batches
    consumed). Memory: none per item; indices are computed ``CHUNK`` at a time from a ``permutation.Permutation``.
    """

    CHUNK = 1 << 16  # indices computed at a time

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        follow_epoch: bool = True,
        items_per_batch: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.items_per_batch = items_per_batch
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.follow_epoch = follow_epoch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this at every epoch start)."""
        if not self.follow_epoch:
            return
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def _positions(self) -> tuple[int, int]:
        """(epoch length after padding or dropping, positions per rank)."""
        per_rank = len(self)
        return per_rank * self.world_size, per_rank

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, in order: int64 [len(self)] (computed, not stored)."""
        return np.concatenate([np.empty(0, np.int64), *self._chunks(0)])

    def _chunks(self, start: int):
        # Position p of the padded epoch is permutation position p % length: the permutation wrapped
        # around, as DistributedSampler pads; this rank takes positions rank, rank + world, ...
        total, per_rank = self._positions()
        order = Permutation(self.length, self.seed * 1_000_003 + self.epoch, self.shuffle)
        first = self.rank + start * self.world_size
        for lo in range(first, total, self.world_size * self.CHUNK):
            positions = np.arange(lo, min(total, lo + self.world_size * self.CHUNK), self.world_size)
            yield order[positions % self.length]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for chunk in self._chunks(self.start):
            for index in chunk.tolist():
                yield (self.epoch, index)

    def __len__(self) -> int:
        # The whole epoch on this rank, also when resuming at ``start``: Lightning counts an epoch's batches
        # from its beginning after a mid-epoch resume, and would end the epoch early on a shorter length.
        return self.length // self.world_size if self.drop_last else math.ceil(self.length / self.world_size)


class Examples:
    """How a split becomes a Dataset (the data config's mode, max_len, eval_max_len, chunk_len and seed).

    ``mode="single"``: one sequence per example (:class:`SingleSequenceDataset`), cropped at random to ``max_len``
    tokens for training and to its first ``eval_max_len`` tokens (default ``max_len``) for evaluation, so runs that
    train on different crop lengths are scored on the same windows. ``mode="concat"``: ``<eos>``-joined chunks of
    ``chunk_len`` tokens (:class:`ConcatChunkDataset`), the same for training and evaluation. ``packing``: training
    examples are windows of at most ``max_len`` tokens covering each protein (``packing.ProteinWindows``; ``max_len``
    None: whole proteins), evaluation as in single mode (``eval_max_len`` None: whole proteins).
    """

    def __init__(
        self,
        mode: str = "single",
        max_len: int | None = 1024,
        eval_max_len: int | None = None,
        chunk_len: int = 8192,
        seed: int = 0,
        packing: bool = False,
    ) -> None:
        if mode not in ("single", "concat"):
            raise ValueError(f"mode must be 'single' or 'concat', got {mode!r}")
        if packing and mode != "single":
            raise ValueError("data.packing=true packs whole proteins and cannot be combined with data.mode=concat "
                             "(fixed chunks across protein boundaries): set data.mode=single or data.packing=false")
        if max_len is None and not packing:
            raise ValueError("data.max_len=null (no crop) needs data.packing=true; set data.max_len")
        self.mode, self.max_len, self.chunk_len, self.seed = mode, max_len, chunk_len, seed
        self.packing = packing
        self.eval_max_len = max_len if eval_max_len is None else eval_max_len

    def dataset(self, sequences: TokenizedSequences, alphabet: Alphabet, train: bool) -> Dataset:
        """The examples of one split (``train``: random crops; evaluation: deterministic ones)."""
        if self.mode == "concat":
            return ConcatChunkDataset(sequences, alphabet, self.chunk_len, seed=self.seed)
        if self.packing and train:
            return ProteinWindows(sequences, alphabet, self.max_len, self.seed)
        max_len = self.max_len if train else self.eval_max_len
        if max_len is None:  # packing without a crop: evaluate whole proteins
            max_len = int(np.max(sequences.lengths, initial=1)) + 2
        return SingleSequenceDataset(sequences, alphabet, max_len, self.seed, random_crop=train)
