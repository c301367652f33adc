"""Exact softmax attention: the reference FAVOR+ approximates (Vaswani et al. 2017; Choromanski et al. 2021).

A thin wrapper over torch's scaled_dot_product_attention with the key_padding_mask convention of
torch.nn.MultiheadAttention (True = padding), used by the "transformer" baseline model.

Packed documents (``cu_seqlens``, ``documents.py``) are attended one document at a time: the block-diagonal
attention exactly, in O(max Lᵢ²) memory. A (T, T) boolean block-diagonal mask would take T² bytes (4 GiB at a
64k-token budget) and make SDPA fall back to its math kernel; FlexAttention's document mask needs torch.compile
(a C++ toolchain on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .documents import check_cu_seqlens, per_document


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v.

    Args:
        q: (B, H, Lq, d); k: (B, H, Lk, d); v: (B, H, Lk, e).
        causal: query i attends to keys j ≤ i.
        key_padding_mask: (B, Lk) bool, True = padding (ignored keys).
        cu_seqlens: (n + 1,) int32 offsets of packed documents (B = 1, Lq = Lk): block-diagonal attention.
    Returns:
        (B, H, Lq, e). A query row that sees no key at all returns 0 (not NaN).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, heads, length, dim], got {tuple(t.shape)}")
    if cu_seqlens is not None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"packed input (cu_seqlens) needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
        check_cu_seqlens(cu_seqlens, q.shape[2], q.shape[0])
        return per_document(lambda qd, kd, vd, md: exact_attention(qd, kd, vd, causal, md), cu_seqlens,
                            q, k, v, key_padding_mask, dim=(2, 2, 2, 1))
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be bool [batch, Lk], got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")
    allowed = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk), SDPA's True = attend
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    # rows with every key masked come back NaN from some backends; define them as 0 like FAVOR does
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
