"""FAVOR+ attention: Fast Attention Via positive Orthogonal Random features.

Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021) and "Masked Language Modeling for
Proteins via Linearly Scalable Long-Context Transformers" (2020); reference implementation
google-research/performer (fast_attention/jax/fast_attention.py), cf. lucidrains/performer-pytorch.

softmax(QKᵀ/√d) V is approximated by φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1) with positive random features
    φ(x) = m^(-1/2) (exp(ωᵢᵀx − ‖x‖²/2 − c) + ε),   x = d^(-1/4)·q or d^(-1/4)·k,
so the cost is O(L·m·d) instead of O(L²·d). The m^(-1/2) factor cancels in the ratio and is dropped.

Stabilisers c (they cancel exactly in the ratio; they only set the scale the ε floor is measured against):
  * queries: per-token max over features.
  * keys, noncausal: one max over all (non-padded) keys and features, per (batch, head), as the reference.
  * keys, causal / step: the *running* max over keys j ≤ i. Position i then uses exactly the stabiliser the
    noncausal call on the prefix [0..i] would use, so causal output i == noncausal output on the prefix
    (ε included), no future key leaks into the past, and the single-step decoder needs only the running
    max as extra state. Earlier contributions are rescaled by exp(c_old − c_new) ≤ 1 when the max grows
    (as in online softmax), so nothing overflows.
Stabilisers are treated as constants in the backward pass (as the reference's stop_gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOFTMAX_EPS = 1e-6  # reference value; performer-pytorch's 1e-4 collapses sharp attention towards the mean
RELU_EPS = 1e-3
_NEG = -1e30  # finite "minus infinity" for stabilisers (keeps exp(a - b) free of inf - inf)
KERNELS = ("softmax", "relu")


# -----------------------------------------------------------------------------
# checks and feature maps


def _check_inputs(q, k, v, P, kernel, causal, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, heads, length, dim], got {_shape(t)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"batch/heads of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
    if P is None:
        if kernel == "softmax":
            raise ValueError("kernel='softmax' needs a projection matrix P")
    elif P.dim() != 2 or P.shape[1] != q.shape[-1]:
        raise ValueError(f"projection must be [num_features, {q.shape[-1]}], got {tuple(P.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be [batch, Lk] = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradient checks), everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _softmax_logits(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """ωᵢᵀx' − ‖x'‖²/2 with x' = d^(-1/4)x: (..., L, d) -> (..., L, m) in the accumulation dtype."""
    x = x.to(_acc(x)) * x.shape[-1] ** -0.25
    return x @ P.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True)


def positive_random_features(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The unstabilised FAVOR+ map φ(x) = m^(-1/2) exp(Px − ‖x‖²/2), so E[φ(q)·φ(k)] = exp(qᵀk).

    No d^(-1/4) scaling, stabiliser or ε (for tests and analysis). x: (..., d), P: (m, d) -> (..., m).
    """
    logits = x @ P.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True)
    return torch.exp(logits) * P.shape[0] ** -0.5


def _query_features(q: torch.Tensor, P: torch.Tensor | None, kernel: str) -> torch.Tensor:
    """φ(q) (without m^(-1/2)): (B, H, L, d) -> (B, H, L, m) float32."""
    if kernel == "relu":
        x = q.to(_acc(q)) * q.shape[-1] ** -0.25
        return torch.relu(x if P is None else x @ P.to(x.dtype).T) + RELU_EPS
    xq = _softmax_logits(q, P)
    cq = xq.amax(-1, keepdim=True).detach()  # per-query stabiliser
    return torch.exp(xq - cq) + SOFTMAX_EPS


def _masked_values(v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """[v, 1] in float32 with padded rows zeroed: the last column yields the normaliser. (B, H, L, e+1)"""
    v1 = torch.cat([v.to(_acc(v)), v.new_ones(v.shape[:-1] + (1,), dtype=_acc(v))], dim=-1)
    if key_padding_mask is not None:
        v1 = v1.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return v1


def _normalise(o: torch.Tensor) -> torch.Tensor:
    """Split [numerator, denominator]; a query that sees no key (all padded) gets 0."""
    return o[..., :-1] / o[..., -1:].clamp_min(1e-30)


# -----------------------------------------------------------------------------
# noncausal


def _favor_noncausal(q, k, v, P, kernel, key_padding_mask) -> torch.Tensor:
    qf = _query_features(q, P, kernel)  # (B, H, Lq, m)
    if kernel == "relu":
        kf = _query_features(k, P, kernel)
    else:
        xk = _softmax_logits(k, P)  # (B, H, Lk, m)
        if key_padding_mask is not None:
            xk = xk.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
        ck = xk.detach().amax(dim=(-1, -2), keepdim=True).clamp_min(_NEG)  # one max per (batch, head)
        kf = torch.exp(xk - ck) + SOFTMAX_EPS
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    kv = kf.transpose(-1, -2) @ _masked_values(v, None)  # (B, H, m, e+1)
    return _normalise(qf @ kv)


# -----------------------------------------------------------------------------
# causal: chunked, O(L·m + m·d) per head


def _causal_keys(k, P, kernel, key_padding_mask):
    """Key features exp(x_j − g_j) stabilised by the running max g_j = max_{j'≤j} max_f x_j'f (no ε).

    Returns kf (B, H, L, m), g (B, H, L) and the ε that multiplies Σ_{j≤i} v_j.
    """
    if kernel == "relu":
        kf = _query_features(k, P, kernel)
        g = kf.new_zeros(kf.shape[:-1])
        eps = 0.0
    else:
        xk = _softmax_logits(k, P)
        if key_padding_mask is not None:
            xk = xk.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
        g = xk.detach().amax(-1).cummax(-1).values.clamp_min(_NEG)  # (B, H, L)
        kf = torch.exp(xk - g.unsqueeze(-1))
        eps = SOFTMAX_EPS
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return kf, g, eps


def _causal_core(qf, kf, v1, g, chunk_size):
    """out_i = Σ_{j≤i} (qf_i·kf_j) exp(g_j − g_i) v1_j for (N, L, ·) inputs with L % chunk_size == 0."""
    N, L, m = qf.shape
    e, T = v1.shape[-1], chunk_size
    n = L // T
    Qc, Kc, Vc = qf.view(N, n, T, m), kf.view(N, n, T, m), v1.view(N, n, T, e)
    gc = g.view(N, n, T)
    # intra-chunk: masked quadratic with the running-max rescaling folded into the mask
    tril = torch.ones(T, T, dtype=torch.bool, device=qf.device).tril()
    D = torch.exp((gc.unsqueeze(-2) - gc.unsqueeze(-1)).clamp_max(0.0)) * tril  # (N, n, T, T) [i, j]
    out = ((Qc @ Kc.transpose(-1, -2)) * D) @ Vc  # (N, n, T, e)
    if n == 1:
        return out.view(N, L, e)
    # inter-chunk: state H_c = Σ_{j before chunk c} kf_j exp(g_j − G_{c-1}) v_jᵀ, G_c = g at the end of chunk c
    G = gc[..., -1]  # (N, n)
    kv = (Kc * torch.exp(gc - G.unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2) @ Vc  # (N, n, m, e)
    states = [kv[:, 0]]
    for c in range(1, n - 1):
        states.append(states[-1] * torch.exp(G[:, c - 1] - G[:, c])[:, None, None] + kv[:, c])
    H = torch.stack(states, dim=1)  # (N, n-1, m, e): state entering chunks 1..n-1
    scale = torch.exp(G[:, :-1].unsqueeze(-1) - gc[:, 1:])  # (N, n-1, T), ≤ 1
    inter = (Qc[:, 1:] @ H) * scale.unsqueeze(-1)
    out = torch.cat([out[:, :1], out[:, 1:] + inter], dim=1)
    return out.view(N, L, e)


def _favor_causal(q, k, v, P, kernel, key_padding_mask, chunk_size) -> torch.Tensor:
    B, H, L, _ = q.shape
    T = max(1, min(chunk_size, L))
    pad = (-L) % T
    if pad:  # right-pad to a whole number of chunks; padded keys come last so they reach no real query
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        mask = key_padding_mask if key_padding_mask is not None else q.new_zeros(B, L, dtype=torch.bool)
        key_padding_mask = torch.nn.functional.pad(mask, (0, pad), value=True)
    qf = _query_features(q, P, kernel)  # (B, H, L', m)
    kf, g, eps = _causal_keys(k, P, kernel, key_padding_mask)
    v1 = _masked_values(v, key_padding_mask)  # (B, H, L', e+1)
    Lp, m, e = qf.shape[2], qf.shape[-1], v1.shape[-1]
    out = _causal_core(qf.reshape(B * H, Lp, m), kf.reshape(B * H, Lp, m), v1.reshape(B * H, Lp, e),
                       g.reshape(B * H, Lp), T).view(B, H, Lp, e)
    if eps:
        # the ε floor of every key feature: Σ_f qf_if · ε · Σ_{j≤i} v_j
        out = out + eps * qf.sum(-1, keepdim=True) * v1.cumsum(2)
    return _normalise(out[:, :, :L])


# -----------------------------------------------------------------------------
# public API


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    P: torch.Tensor | None,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """FAVOR+ approximation of scaled_dot_product_attention(q, k, v, is_causal=causal).

    Args:
        q: (B, H, Lq, d) queries (unscaled; d^(-1/4) is applied here).
        k: (B, H, Lk, d) keys.
        v: (B, H, Lk, e) values, any e (noncausal also accepts Lq != Lk).
        P: (m, d) projection from `gaussian_projection`; may be None for kernel="relu" (φ(x) = relu(x) + 1e-3).
        kernel: "softmax" (positive random features) or "relu" (relu(xPᵀ) + 1e-3).
        causal: position i attends to keys j ≤ i (needs Lq == Lk); computed in chunks, O(L·m + m·d) memory.
        key_padding_mask: (B, Lk) bool, True = padding; padded keys enter neither numerator nor normaliser.
        chunk_size: causal chunk length (does not change the result).
    Returns:
        (B, H, Lq, e) in the dtype of v; computed in float32.
    """
    _check_inputs(q, k, v, P, kernel, causal, key_padding_mask)
    if causal:
        out = _favor_causal(q, k, v, P, kernel, key_padding_mask, chunk_size)
    else:
        out = _favor_noncausal(q, k, v, P, kernel, key_padding_mask)
    return out.to(v.dtype)


@dataclass
class FavorState:
    """Decoding state per (batch, head): O(m·e) regardless of how many tokens were consumed.

    kv: (B, H, m, e+1) Σ_j exp(x_j − g) [v_j, 1] relative to the running max g; vsum: (B, H, e+1) Σ_j [v_j, 1]
    (carries the ε floor); g: (B, H) running key max (_NEG before the first key; 0 for kernel="relu").
    """

    kv: torch.Tensor
    vsum: torch.Tensor
    g: torch.Tensor

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
        (None = empty).
    Returns:
        (out_t (B, H, 1, e) in v_t's dtype, new state). Constant time and memory per token.
    """
    _check_inputs(q_t, k_t, v_t, P, kernel, True, None)
    if q_t.shape[2] != 1:
        raise ValueError(f"favor_step takes one token, got length {q_t.shape[2]}")
    B, H = q_t.shape[:2]
    qf = _query_features(q_t, P, kernel)  # (B, H, 1, m)
    v1 = _masked_values(v_t, None)  # (B, H, 1, e+1)
    if state is None:
        state = FavorState.zeros(B, H, qf.shape[-1], v_t.shape[-1], q_t.device, qf.dtype)
    if kernel == "relu":
        kf, g, eps = _query_features(k_t, P, kernel), state.g, 0.0
        kv = state.kv + kf.transpose(-1, -2) @ v1
    else:
        xk = _softmax_logits(k_t, P)  # (B, H, 1, m)
        g = torch.maximum(state.g, xk.amax(dim=(-1, -2)))
        kf = torch.exp(xk - g[..., None, None])
        kv = state.kv * torch.exp(state.g - g)[..., None, None] + kf.transpose(-1, -2) @ v1
        eps = SOFTMAX_EPS
    vsum = state.vsum + v1[:, :, 0]
    out = qf @ kv + eps * qf.sum(-1, keepdim=True) * vsum.unsqueeze(2)
    return _normalise(out).to(v_t.dtype), FavorState(kv=kv, vsum=vsum, g=g)
