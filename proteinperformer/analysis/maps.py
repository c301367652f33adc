"""Attention maps of a protein language model: which residues each residue "looks at", per layer and head.

A Performer never forms the L×L attention matrix; FAVOR+ computes φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1) directly.
The matrix it implies is recovered as in Choromanski et al. (2020, Fig. 6): run FAVOR with V = one-hot
positions, so the output row i is the attention distribution of query i over all keys (rows sum to 1).
This is done in blocks of query rows (and, for the one-hot values, blocks of key columns), so a
10,000-residue protein needs at most one block × L slice per head in memory. Exact (softmax) layers use
softmax(QKᵀ/√d) directly; causal models keep their causal mask (keys after the query get 0).

Maps cover residue positions only: the ``<cls>`` / ``<eos>`` rows and columns are dropped. Rows are NOT
renormalised by default, so a row sums to 1 minus the attention that went to ``<cls>``/``<eos>``
(``renormalise=True`` rescales each residue row to sum to 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from proteinperformer.attention import MultiheadSelfAttention, favor_attention
from proteinperformer.model import PerformerLM
from proteinperformer.tokenizer import Alphabet


class AttentionBlock(NamedTuple):
    """One piece of the attention maps of a sequence.

    layer: layer index (0-based); heads: the head indices in ``values``; rows: residue rows (query
    positions, 0-based, residue coordinates); values: Tensor [len(heads), rows.stop - rows.start, L].
    """

    layer: int
    heads: list[int]
    rows: slice
    values: torch.Tensor


def as_performer(model: torch.nn.Module) -> PerformerLM:
    """The PerformerLM inside ``model`` (a PerformerLM itself, or a ProteinLM holding one as ``.model``)."""
    if isinstance(model, PerformerLM):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, PerformerLM):
        return inner
    raise TypeError(f"expected a PerformerLM or ProteinLM, got {type(model).__name__}")


def encode(sequence: str, alphabet: Alphabet | None = None) -> torch.Tensor:
    """Residue string of length L -> LongTensor [1, L + 2]: ``<cls>`` residues ``<eos>``."""
    alphabet = alphabet or Alphabet()
    ids = alphabet.encode(sequence)
    return torch.cat([torch.tensor([alphabet.cls_idx]), ids, torch.tensor([alphabet.eos_idx])])[None]


@torch.no_grad()
def attention_inputs(model: torch.nn.Module, sequence: str) -> list[torch.Tensor]:
    """The input of every attention layer, i.e. ``layers[i].norm1(hidden)``: a list of [1, L + 2, D] tensors.

    Captured with forward hooks during one ordinary forward pass (linear cost in L for FAVOR models).
    """
    net = as_performer(model)
    captured: list[torch.Tensor] = [None] * len(net.layers)
    hooks = []
    for i, block in enumerate(net.layers):
        def hook(_module, args, _output, i=i):
            captured[i] = args[0].detach()
        hooks.append(block.attn.register_forward_hook(hook))
    was_training = net.training
    net.eval()  # no dropout
    try:
        tokens = encode(sequence, net.alphabet).to(next(net.parameters()).device)
        net(tokens)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return captured


def _favor_rows(attn: MultiheadSelfAttention, q, k, rows: slice, col_block: int, heads: list[int]) -> torch.Tensor:
    """Token-level FAVOR attention rows ``rows`` over the residue columns 1..T-2, via V = one-hot positions.

    q, k: [1, h, T, d] (all tokens) of the layer's ``heads``. Returns [h, n_rows, T - 2] float32. The normaliser
    φ(q)·Σφ(k) uses all keys (cls/eos included), whatever the width of V, so each full token row sums to 1.
    """
    h, T = q.shape[1], q.shape[2]
    L = T - 2
    raw_q, raw_k = q, k  # a causal layer with a window (window.py) takes them as they are
    q, k, P = attn.feature_inputs(q, k, heads)  # trained features, FAVOR++ (oprf): what the kernel takes
    out = torch.zeros(h, rows.stop - rows.start, L)
    for c0 in range(0, L, col_block):
        c1 = min(L, c0 + col_block)
        if attn.causal and c0 + 1 >= rows.stop:  # keys after every query of the block: all zero
            break
        onehot = torch.zeros(T, c1 - c0, device=q.device)
        onehot[torch.arange(c0 + 1, c1 + 1), torch.arange(c1 - c0)] = 1.0  # token column c+1 = residue c
        if attn.causal:  # causal needs Lq == Lk: run on the prefix that ends with the block's last query
            end = rows.stop
            v = onehot[:end].expand(1, h, end, c1 - c0)
            if attn.window:  # the sliding-window hybrid: exact weights on the last W keys
                block = attn.favor(raw_q[:, :, :end], raw_k[:, :, :end], v, heads=heads)
            else:
                block = favor_attention(q[:, :, :end], k[:, :, :end], v, P, attn.favor_kernel, causal=True)
            block = block[0, :, rows.start:]
        else:
            v = onehot.expand(1, h, T, c1 - c0)
            block = favor_attention(q[:, :, rows], k, v, P, attn.favor_kernel)[0]
        out[:, :, c0:c1] = block.float()
    return out


def _exact_rows(attn: MultiheadSelfAttention, q, k, rows: slice) -> torch.Tensor:
    """softmax(q kᵀ/√d) for token rows ``rows`` (causal mask if the layer is causal), residue columns only.

    q, k: [1, h, T, d]. Returns [h, n_rows, T - 2] float32.
    """
    T, d = k.shape[2], k.shape[-1]
    scores = (q[0, :, rows].float() @ k[0].float().transpose(-1, -2)) / math.sqrt(d)  # [h, n, T]
    if attn.causal:
        qpos = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(T, device=q.device)[None] > qpos, float("-inf"))
    return torch.softmax(scores, dim=-1)[:, :, 1 : T - 1]


@torch.no_grad()
def iter_attention_blocks(
    model: torch.nn.Module,
    sequence: str,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    block_size: int = 512,
    head_block: int | None = None,
    renormalise: bool = False,
) -> Iterator[AttentionBlock]:
    """Stream the attention maps of one protein in blocks of query rows.

    Args:
        model: PerformerLM or ProteinLM (run in eval mode, i.e. without dropout).
        sequence: amino-acid string of length L.
        layers: layer indices (default: all); heads: head indices within each layer (default: all).
        block_size: query rows per block (and key columns per one-hot block for FAVOR).
        head_block: heads per yielded block (default: all requested heads at once).
        renormalise: rescale each residue row to sum to 1 (default: raw rows, which miss the attention
            paid to ``<cls>``/``<eos>``).
    Yields:
        AttentionBlock(layer, heads, rows, values [len(heads), len(rows), L]) — residue coordinates.
    """
    net = as_performer(model)
    layers = list(range(len(net.layers))) if layers is None else list(layers)
    inputs = attention_inputs(net, sequence)
    L = len(sequence[:-1] if sequence.endswith("*") else sequence)
    for layer in layers:
        attn = net.layers[layer].attn
        q, k, _ = attn.split_heads(inputs[layer])  # [1, H, T, d]
        wanted = list(range(attn.heads)) if heads is None else list(heads)
        step = head_block or len(wanted)
        for h0 in range(0, len(wanted), step):
            hs = wanted[h0 : h0 + step]
            qh, kh = q[:, hs], k[:, hs]
            for r0 in range(0, L, block_size):
                rows = slice(r0, min(L, r0 + block_size))
                token_rows = slice(rows.start + 1, rows.stop + 1)
                if attn.attention == "exact":
                    values = _exact_rows(attn, qh, kh, token_rows)
                else:
                    values = _favor_rows(attn, qh, kh, token_rows, block_size, hs)
                if renormalise:
                    values = values / values.sum(-1, keepdim=True).clamp_min(1e-30)
                yield AttentionBlock(layer, hs, rows, values)


@torch.no_grad()
def attention_maps(
    model: torch.nn.Module,
    sequence: str,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    block_size: int = 512,
    renormalise: bool = False,
) -> torch.Tensor:
    """All attention maps of one protein: Tensor [n_layers, n_heads, L, L] (float32, residue positions only).

    ``maps[l, h, i, j]`` is how much residue i attends to residue j in the l-th requested layer and h-th
    requested head. Rows are not renormalised unless ``renormalise`` (see module docstring); the full
    token rows (with ``<cls>``/``<eos>``) sum to 1. Memory is the output itself, L² per (layer, head);
    use :func:`iter_attention_blocks` to stream very long proteins instead.
    """
    net = as_performer(model)
    layers = list(range(len(net.layers))) if layers is None else list(layers)
    n_heads = net.config.heads if heads is None else len(heads)
    L = len(sequence[:-1] if sequence.endswith("*") else sequence)
    out = torch.zeros(len(layers), n_heads, L, L)
    index = {layer: i for i, layer in enumerate(layers)}
    for blk in iter_attention_blocks(net, sequence, layers, heads, block_size, renormalise=renormalise):
        out[index[blk.layer], :, blk.rows] = blk.values
    return out
