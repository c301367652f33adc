"""Rotary position embeddings (RoPE; Su et al. 2021, RoFormer), exactly as ESM-2 applies them.

Position p rotates each pair (x_i, x_{i+d/2}) of a query or key by the angle p·θ_i with
θ_i = 10000^(−2i/d) (the "rotate_half" layout of fair-esm ``esm/rotary_embedding.py`` and Hugging Face's
``EsmRotaryEmbedding``, not the interleaved pairs of the RoFormer paper). Since (R_i q)·(R_j k) depends on
i − j only, attention sees relative positions and there is no length cap.

For FAVOR+ the rotation is applied to q and k *before* the random feature map, so φ(R_i q)·φ(R_j k) is an
unbiased estimate of exp((R_i q)·(R_j k)), i.e. of softmax attention with RoPE scores.
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, device=None) -> torch.Tensor:
    """θ_i = 1 / 10000^(2i/d) for i < d/2: float32 [d/2] (fair-esm's ``rot_emb.inv_freq`` buffer)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rotary_tables(
    length: int, head_dim: int, start: int = 0, device=None, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles of positions start..start+length−1 (or of ``positions``, LongTensor [length]):
    two float32 [length, d] tables."""
    t = torch.arange(start, start + length, device=device).float() if positions is None else positions.float()
    freqs = torch.outer(t, inverse_frequencies(head_dim, device))  # [L, d/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [L, d]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (−x2, x1) over the halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None,
                 tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotate queries or keys x [..., L, d] by their positions start..start+L−1, or by ``positions``
    (LongTensor [L], e.g. restarting at each packed document), in float32 (float64 kept); ``tables``: their
    :func:`rotary_tables`, computed once for queries and keys (autograd then keeps one pair for both).

    Returns a tensor of x's shape and dtype.
    """
    cos, sin = rotary_tables(x.shape[-2], x.shape[-1], start, x.device, positions) if tables is None else tables
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
