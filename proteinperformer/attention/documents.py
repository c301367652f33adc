"""Packed documents: many proteins in one flat token stream, told apart by ``cu_seqlens`` offsets.

The layout of flash-attention's ``*_varlen`` functions and flash-linear-attention's ``cu_seqlens``: tokens of
shape (1, T) hold n documents back to back, and ``cu_seqlens`` (n + 1,) int32 holds their offsets, 0 first and T
last, so document i is tokens ``cu_seqlens[i] : cu_seqlens[i + 1]``. Every attention path computes each document
alone (no token attends across a boundary), and positions restart at 0 in every document.
"""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, length: int, batch: int = 1) -> None:
    """ValueError unless ``cu_seqlens`` is (n + 1,) integer offsets rising from 0 to ``length`` for a batch of 1."""
    if batch != 1:
        raise ValueError(f"packed input (cu_seqlens) needs a batch of 1 flat stream, got batch {batch}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-d tensor of n + 1 >= 2 offsets, got {cu_seqlens!r}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != length or any(b <= a for a, b in zip(c, c[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the stream length {length}, got {c}")


def document_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...]: the token range of each document (read once on the host)."""
    c = cu_seqlens.tolist()
    return list(zip(c[:-1], c[1:], strict=True))


def document_positions(cu_seqlens: torch.Tensor, device=None) -> torch.Tensor:
    """LongTensor (T,): each token's position inside its document (0 at every document start)."""
    c = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = c[1:] - c[:-1]
    starts = torch.repeat_interleave(c[:-1], lengths)
    return torch.arange(int(c[-1]), device=device) - starts


def per_document(fn, cu_seqlens: torch.Tensor, *tensors: torch.Tensor | None, dim: int | tuple[int, ...] = 2):
    """``fn`` applied to each document's piece of ``tensors`` (split along ``dim``, or one dim per tensor; None stays
    None), the results concatenated along the first tensor's dim.

    Exact by construction: each document is computed exactly as it would be alone. The pieces come from one
    ``split`` (whose backward is one concatenation: slicing each document out would make a full-size gradient per
    document, O(n·T)).
    """
    dims = (dim,) * len(tensors) if isinstance(dim, int) else dim
    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    pieces = [[None] * len(sizes) if t is None else t.split(sizes, d) for t, d in zip(tensors, dims, strict=True)]
    return torch.cat([fn(*parts) for parts in zip(*pieces, strict=True)], dim=dims[0])
