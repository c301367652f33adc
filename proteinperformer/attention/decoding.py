"""Cached causal decoding with FAVOR+: one token at a time in constant time and memory.

The causal sums S_t = Σ_{j≤t} φ(k_j)[v_j, 1]ᵀ are all a decoder needs to carry (O(m·e) per head, however many
tokens came before), plus the running key max for positive random features. Each step equals row t of
favor_attention(..., causal=True) over all tokens so far (performer-pytorch has no cached decoding: #97).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .favor import _check_inputs
from .features import _NEG, FeatureMap, PositiveRandomFeatures, feature_map
from .normaliser import _normalise, _values_with_ones
from .precision import _acc, _autocast_dtype, _float32_region


@dataclass
class FavorState:
    """Decoding state per (batch, head): O(m·e) regardless of how many tokens were consumed.

    kv: (B, H, m, e+1) Σ_j exp(x_j − g) [v_j, 1] relative to the running max g (Σ_j φ(k_j) [v_j, 1] for a map
    without a stabiliser); vsum: (B, H, e+1) Σ_j [v_j, 1] (carries the ε floor); g: (B, H) running key max (_NEG
    before the first key, and always for a map without a stabiliser); position: tokens consumed so far, a host-side
    int (reading it from a tensor would sync the device every step).
    """

    kv: torch.Tensor
    vsum: torch.Tensor
    g: torch.Tensor
    position: int = 0

    @staticmethod
    def zeros(
        batch: int, heads: int, num_features: int, value_dim: int, device=None, dtype=torch.float32
    ) -> FavorState:
        """Empty state for a (batch, heads) decoder with m features and e-dimensional values."""
        kw = dict(dtype=dtype, device=device)
        return FavorState(
            kv=torch.zeros(batch, heads, num_features, value_dim + 1, **kw),
            vsum=torch.zeros(batch, heads, value_dim + 1, **kw),
            g=torch.full((batch, heads), _NEG, **kw),
        )


def favor_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    P: torch.Tensor | None,
    state: FavorState | None = None,
    kernel: str = "softmax",
) -> tuple[torch.Tensor, FavorState]:
    """One causal decoding step: equals row t of favor_attention(..., causal=True) over all tokens so far.

    Args:
        q_t, k_t: (B, H, 1, d); v_t: (B, H, 1, e); P: (m, d) or None (relu); state: from the previous step
        (None = empty); kernel: a registered feature map (see ``features.py``).
    Returns:
        (out_t (B, H, 1, e), new state). Constant time and memory per token. The state is float32 (float64 for
        float64 inputs); out_t has the autocast dtype inside torch.autocast, else v_t's dtype.
    """
    fmap = feature_map(kernel)
    _check_inputs(q_t, k_t, v_t, P, fmap, True, None)
    if q_t.shape[2] != 1:
        raise ValueError(f"favor_step takes one token, got length {q_t.shape[2]}")
    out_dtype = _autocast_dtype(q_t) or v_t.dtype
    out, state = _favor_step(q_t, k_t, v_t, P, state, fmap)
    return out.to(out_dtype), state


@_float32_region
def _favor_step(q_t, k_t, v_t, P, state, fmap: FeatureMap) -> tuple[torch.Tensor, FavorState]:
    B, H = q_t.shape[:2]
    qf = fmap.features(q_t, P)  # (B, H, 1, m)
    v1 = _values_with_ones(v_t.to(_acc(v_t)), None)  # (B, H, 1, e+1)
    if state is None:
        state = FavorState.zeros(B, H, qf.shape[-1], v_t.shape[-1], q_t.device, qf.dtype)
    if isinstance(fmap, PositiveRandomFeatures):
        xk = fmap.logits(k_t, P)  # (B, H, 1, m)
        g = torch.maximum(state.g, xk.amax(dim=(-1, -2)))  # running key max
        kf = torch.exp(xk - g[..., None, None])
        kv = state.kv * torch.exp(state.g - g)[..., None, None] + kf.transpose(-1, -2) @ v1
        eps = fmap.eps  # the ε floor of φ(k), through vsum
    else:
        kf, g, eps = fmap.features(k_t, P), state.g, 0.0  # φ(k) carries its own floor
        kv = state.kv + kf.transpose(-1, -2) @ v1
    vsum = state.vsum + v1[:, :, 0]
    out = qf @ kv + eps * qf.sum(-1, keepdim=True) * vsum.unsqueeze(2)
    return _normalise(out), FavorState(kv=kv, vsum=vsum, g=g, position=state.position + 1)
