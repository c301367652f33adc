"""FAVOR+ attention: Fast Attention Via positive Orthogonal Random features. The public entry point.

Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021) and "Masked Language Modeling for
Proteins via Linearly Scalable Long-Context Transformers" (2020); reference implementation
google-research/performer (fast_attention/jax/fast_attention.py), cf. lucidrains/performer-pytorch.

softmax(QKᵀ/√d) V is approximated by φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1) with a positive feature map φ, so the cost is
O(L·m·d) instead of O(L²·d). One idea per module, read in this order:
    features.py    the feature maps φ (kernel "softmax": positive random features, "relu"), registered by name
    normaliser.py  numerator and normaliser from one product with [V, 1]
    precision.py   the float32 region every path runs in under autocast
    noncausal.py   φ(Q)(φ(K)ᵀ[V, 1])
    causal.py      the chunked causal scan
    decoding.py    FavorState and favor_step, one token at a time
    reference.py   the definition, quadratic and plain: what the paths above are tested against
"""

from __future__ import annotations

import torch

from .causal import _favor_causal
from .documents import check_cu_seqlens
from .features import FeatureMap, feature_map
from .noncausal import _favor_noncausal
from .precision import _autocast_dtype


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_inputs(q, k, v, P, fmap: FeatureMap, causal, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, heads, length, dim], got {_shape(t)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"batch/heads of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
    if P is None:
        if fmap.needs_projection:
            raise ValueError(f"kernel={fmap.name!r} needs a projection matrix P")
    elif P.shape[-1] != q.shape[-1] or not (P.dim() == 2 or (fmap.learned and P.dim() == 3 and len(P) == q.shape[1])):
        per_head = f" or, for a learned map, [{q.shape[1]} heads, num_features, {q.shape[-1]}]" if fmap.learned else ""
        raise ValueError(f"projection must be [num_features, {q.shape[-1]}]{per_head}, got {tuple(P.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be [batch, Lk] = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    P: torch.Tensor | None,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    group_size: int = 4096,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAVOR+ approximation of scaled_dot_product_attention(q, k, v, is_causal=causal).

    Args:
        q: (B, H, Lq, d) queries (unscaled; d^(-1/4) is applied here).
        k: (B, H, Lk, d) keys.
        v: (B, H, Lk, e) values, any e (noncausal also accepts Lq != Lk).
        P: (m, d) projection from `gaussian_projection`; may be None for kernel="relu" (φ(x) = relu(x) + 1e-3).
        kernel: a registered feature map (``features.FEATURE_MAPS``): "softmax" (positive random features) or
            "relu" (relu(xPᵀ) + 1e-3); unknown names raise ValueError listing the registered ones.
        causal: position i attends to keys j ≤ i (needs Lq == Lk); computed in chunks, O(L·m + m·d) memory.
        key_padding_mask: (B, Lk) bool, True = padding; padded keys enter neither numerator nor normaliser.
        chunk_size: causal chunk length T (does not change the result; cost ∝ L·T·m inside chunks); None = 64
            (``causal.CHUNK``).
        group_size: causal positions processed per batched step, at most (memory/speed knob, result unchanged; on a
            CPU the kernel takes fewer, see ``causal._sizes``).
        cu_seqlens: (n + 1,) int32 offsets of packed documents (B = 1, Lq = Lk; ``documents.py``): each document
            attends only to itself, exactly as if run alone (causal: the running state resets at each start).
    Returns:
        (B, H, Lq, e) computed in float32; returned in the autocast dtype inside torch.autocast, else in v's dtype.
    """
    fmap = feature_map(kernel)
    _check_inputs(q, k, v, P, fmap, causal, key_padding_mask)
    if cu_seqlens is not None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"packed input (cu_seqlens) needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
        check_cu_seqlens(cu_seqlens, q.shape[2], q.shape[0])
    out_dtype = _autocast_dtype(q) or v.dtype
    if causal:
        out = _favor_causal(q, k, v, P, fmap, key_padding_mask, chunk_size, group_size, cu_seqlens=cu_seqlens)
    else:
        out = _favor_noncausal(q, k, v, P, fmap, key_padding_mask, cu_seqlens)
    return out.to(out_dtype)
