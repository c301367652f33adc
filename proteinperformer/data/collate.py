"""Collators: pad a list of dataset items into a batch and build MLM or CLM inputs and labels.

Masking randomness comes from each item's ``seed`` (see ``datasets.example_seed``), so a batch is a
pure function of which examples it holds, whatever the worker, rank or resume point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proteinperformer.tokenizer import Alphabet

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def pad_tokens(items: Sequence[dict], pad_idx: int) -> torch.Tensor:
    """Right-pad the ``tokens`` of each item to the longest: LongTensor [B, T]."""
    width = max(len(item["tokens"]) for item in items)
    out = torch.full((len(items), width), pad_idx, dtype=torch.int64)
    for row, item in enumerate(items):
        out[row, : len(item["tokens"])] = item["tokens"]
    return out


class MLMCollator:
    """BERT-style masking of residues only (special tokens and padding are never selected).

    ``mask_prob`` (15%) of residue positions are selected; of those 80% become ``<mask>``, 10% a random
    standard residue, 10% stay unchanged. Labels hold the original token at selected positions and
    ``IGNORE_INDEX`` elsewhere, so the loss is computed on selected positions only.

    Returns ``{"input_ids": [B, T], "labels": [B, T], "padding_mask": bool [B, T] (True = pad)}``.
    """

    def __init__(
        self, alphabet: Alphabet, mask_prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1
    ) -> None:
        if not (0 < mask_prob < 1 and 0 <= mask_frac and 0 <= random_frac and mask_frac + random_frac <= 1):
            raise ValueError(f"bad masking rates mask_prob={mask_prob} mask_frac={mask_frac} random_frac={random_frac}")
        self.alphabet = alphabet
        self.mask_prob, self.mask_frac, self.random_frac = mask_prob, mask_frac, random_frac
        self.standard = torch.tensor(alphabet.standard_ids)

    @classmethod
    def for_evaluation(cls, alphabet: Alphabet, mask_prob: float = 0.15) -> MLMCollator:
        """Validation and test masking: ``mask_prob`` of the residues, every one replaced by ``<mask>``. With BERT's
        10% kept targets a model would score free hits by copying its input, inflating accuracy by ~10 points."""
        return cls(alphabet, mask_prob, mask_frac=1.0, random_frac=0.0)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        tokens = pad_tokens(items, self.alphabet.padding_idx)
        u_select, u_action, random_ids = (torch.empty_like(tokens, dtype=torch.float32) for _ in range(3))
        for row, item in enumerate(items):
            g = torch.Generator().manual_seed(int(item["seed"]))
            u_select[row] = torch.rand(tokens.shape[1], generator=g)
            u_action[row] = torch.rand(tokens.shape[1], generator=g)
            random_ids[row] = torch.rand(tokens.shape[1], generator=g)
        selected = self.alphabet.is_residue(tokens) & (u_select < self.mask_prob)
        labels = torch.where(selected, tokens, IGNORE_INDEX)
        inputs = tokens.clone()
        to_mask = selected & (u_action < self.mask_frac)
        to_random = selected & (u_action >= self.mask_frac) & (u_action < self.mask_frac + self.random_frac)
        inputs[to_mask] = self.alphabet.mask_idx
        replacement = self.standard[(random_ids * len(self.standard)).long().clamp_max(len(self.standard) - 1)]
        inputs[to_random] = replacement[to_random]
        return {"input_ids": inputs, "labels": labels, "padding_mask": tokens == self.alphabet.padding_idx}


class CLMCollator:
    """Next-token prediction: ``input_ids = tokens[:, :-1]``, ``labels = tokens[:, 1:]`` (pad -> ignored).

    Returns ``{"input_ids": [B, T-1], "labels": [B, T-1], "padding_mask": bool [B, T-1]}``.
    """

    def __init__(self, alphabet: Alphabet) -> None:
        self.alphabet = alphabet

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        tokens = pad_tokens(items, self.alphabet.padding_idx)
        pad = tokens == self.alphabet.padding_idx
        labels = tokens[:, 1:].masked_fill(pad[:, 1:], IGNORE_INDEX)
        return {"input_ids": tokens[:, :-1], "labels": labels, "padding_mask": pad[:, :-1]}
