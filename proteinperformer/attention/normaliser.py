"""The FAVOR+ output as one ratio: numerator φ(Q)(φ(K)ᵀV) and normaliser φ(Q)(φ(K)ᵀ1) from the same products.

Appending a ones column to V makes the last output column the normaliser, so every path (noncausal, causal,
decoding) computes both with the same GEMMs and splits them at the end. A padded key gets a zero row, so it enters
neither the numerator nor the normaliser (performer-pytorch #89 zeroes V only).
"""

from __future__ import annotations

import torch

_NO_KEY = 1e-30  # floor of the normaliser: a query that sees no key (numerator = normaliser = 0) gets output 0


def _values_with_ones(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[v, 1] with padded rows zeroed: (..., L, e) -> (..., L, e+1) in v's dtype.

    mask: bool, True = padding, broadcastable to v's shape without its last dim ((N, L) for (N, L, e) values,
    (B, 1, L) for (B, H, L, e)).
    """
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return v1 if mask is None else v1.masked_fill_(mask.unsqueeze(-1), 0.0)


def _normalise(o: torch.Tensor) -> torch.Tensor:
    """Split [numerator, denominator]; a query that sees no key (all padded) gets 0."""
    return o[..., :-1] / o[..., -1:].clamp_min(_NO_KEY)


def _normaliser_backward(grad: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """out = num / den: gradient wrt [num, den], (N, L, e) -> (N, L, e+1); den is the clamped normaliser.

    A query that sees no key has output 0 whatever the inputs, so its gradient is 0. Dividing by the floor would
    give it grad·1e30, which cancels out of the causal ε-floor sums only up to rounding (left padding then wrecked
    the value gradients of the real keys: relative error 1e17 in float32).
    """
    dnum = torch.cat([grad, -(grad * out).sum(-1, keepdim=True)], dim=-1) / den
    return dnum.masked_fill_(den <= _NO_KEY, 0.0)
