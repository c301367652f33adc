"""Sliding-window hybrid attention (LoLCATs, Zhang et al. 2024; "Based", Arora et al. 2024), causal only.

Exact softmax over the last W keys, positive-feature (FAVOR) attention over every older key, one normaliser:

    y_i = (Σ_{i−W<j≤i} exp(s_ij) v_j + Σ_{j≤i−W} φ(q_i)ᵀφ(k_j) v_j) / (the same sums without v_j),

s_ij = q_iᵀk_j/√d, and φ(q)ᵀφ(k) = (1/m) Σ_f exp(ℓ_f(q) + ℓ_f(k) + δ(q)) an estimate of exp(s). The caller gives
the feature logits ℓ (exp-type maps only: FAVOR+ and FAVOR++, ``module.MultiheadSelfAttention.window_logits``)
and the log-scale δ (B, H, L) that puts them on exp(s)'s scale (FAVOR++'s per-head constants and the dense map's
per-query key shift, which plain FAVOR's ratio cancels but a sum with exact terms does not). Only tokens of the same
document (``cu_seqlens``) and no padded key enter either sum. The features have no ε floor (the pure estimator).

Stabilisers (constants in the backward pass): the query's max logit c_q, one key max c_k per document, and per
query M = max(largest window score, log of the feature normaliser); every exp(·) that is summed is ≤ 1 or a
bounded rescale. The feature sum runs on the existing causal linear-attention scan (``causal._linear_op``) with
keys and values shifted W positions later inside each document, so query i meets exactly the keys j ≤ i − W; the
window sum is banded: query chunk c of W positions against key chunks c − 1 and c. Decoding keeps the FAVOR state
of keys that left the window plus a buffer of the last W keys (:class:`WindowState`, :func:`window_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .causal import _document_ids, _linear_op, _sizes
from .features import _NEG
from .normaliser import _NO_KEY, _normalise, _values_with_ones
from .precision import _acc, _autocast_dtype, _float32_region


def check_window(window: int) -> None:
    """ValueError unless ``window`` is an int ≥ 0 (0 = off)."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"attention window must be an integer >= 0 (0 = off), got {window!r}")


def _combine(num_f: torch.Tensor, lam: torch.Tensor, scores: torch.Tensor, weighted) -> torch.Tensor:
    """The shared normaliser. num_f (..., e+1): feature sums Σ Q·K [v, 1] whose true scale is exp(lam) (...,);
    scores (..., w): window scores (−inf where masked); weighted(p): Σ_w p [v, 1] (..., e+1) for weights p
    (..., w) -> y (..., e)."""
    with torch.no_grad():
        log_f = lam + num_f[..., -1].clamp_min(_NO_KEY).log()
        M = torch.maximum(scores.amax(-1), log_f).clamp_min(_NEG)  # every summed term relative to the larger
    p = torch.exp(scores - M.unsqueeze(-1))
    return _normalise(num_f * torch.exp(lam - M).unsqueeze(-1) + weighted(p))


def _document_max(x: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """Max of x (B, H, L) over each document (doc (L,) ids ≥ 0), spread back to (B, H, L)."""
    idx = doc.expand_as(x)
    top = x.new_full((*x.shape[:-1], int(doc.max()) + 1), _NEG).scatter_reduce(-1, idx, x, "amax")
    return top.gather(-1, idx)


@_float32_region
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_logits: torch.Tensor,
                     k_logits: torch.Tensor, shift: torch.Tensor, window: int,
                     key_padding_mask: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal sliding-window hybrid attention (module docstring).

    Args:
        q, k: (B, H, L, d) queries and keys of the exact window scores qᵀk/√d.
        v: (B, H, L, e) values.
        q_logits, k_logits: (B, H, L, m) feature logits ℓ of queries and keys (φ ∝ exp ℓ).
        shift: (B, H, L) log-scale δ of each query's feature products (see the module docstring).
        window: W ≥ 1 keys j with i − W < j ≤ i get exact weights; 0 is not handled here (plain FAVOR).
        key_padding_mask: (B, L) bool, True = padding.
        cu_seqlens: (n + 1,) offsets of packed documents (B = 1): neither sum crosses a document boundary.
    Returns:
        (B, H, L, e) in float32 (float64 for float64 inputs); the autocast dtype inside torch.autocast, else v's.
    """
    if window < 1:
        raise ValueError(f"window_attention needs window >= 1, got {window}")
    out_dtype = _autocast_dtype(q) or v.dtype
    B, H, L, d = q.shape
    acc = _acc(q)
    q, k, v, ql, kl, shift = (t.to(acc) for t in (q, k, v, q_logits, k_logits, shift))
    m = ql.shape[-1]
    doc = _document_ids(cu_seqlens, L, L, q.device)  # (L,)
    pad = None if key_padding_mask is None else key_padding_mask[:, None, :]  # (B, 1, L)
    v1 = _values_with_ones(v, pad)  # (B, H, L, e+1), padded keys zero

    # feature term over keys j ≤ i − W of the same document: the causal scan on keys and values W positions later
    with torch.no_grad():
        cq = ql.amax(-1)
        top = kl.amax(-1)
        if pad is not None:
            top = top.masked_fill(pad, _NEG)
        ck = _document_max(top, doc)
    Qf = torch.exp(ql - cq.unsqueeze(-1))
    Kf = torch.exp(kl - ck.unsqueeze(-1))
    if pad is not None:
        Kf = Kf.masked_fill(pad.unsqueeze(-1), 0.0)
    if window < L:
        same = (doc[window:] == doc[:-window]).to(acc)[:, None]  # key i − W in i's document
        Ks = F.pad(Kf[:, :, :-window] * same, (0, 0, window, 0))
        Vs = F.pad(v1[:, :, :-window] * same, (0, 0, window, 0))
        num_f = _causal_sums(Qf, Ks, Vs, cu_seqlens)
    else:
        num_f = v1.new_zeros(v1.shape)
    lam = cq + ck - math.log(m) + shift  # true feature products = computed · exp(lam)

    # window term: query chunk c (C positions) against key chunks c − 1 and c
    C = min(window, L)
    n = -(-L // C)
    Lp = n * C
    qc = F.pad(q, (0, 0, 0, Lp - L)).view(B, H, n, C, d)
    kc = F.pad(k, (0, 0, C, Lp - L)).view(B, H, n + 1, C, d)
    vc = F.pad(v1, (0, 0, C, Lp - L)).view(B, H, n + 1, C, v1.shape[-1])
    k2 = torch.cat([kc[:, :, :-1], kc[:, :, 1:]], dim=3)  # (B, H, n, 2C, d)
    v2 = torch.cat([vc[:, :, :-1], vc[:, :, 1:]], dim=3)
    scores = qc @ k2.transpose(-1, -2) / math.sqrt(d)  # (B, H, n, C, 2C)
    qpos = torch.arange(Lp, device=q.device).view(n, C, 1)
    kpos = (torch.arange(n, device=q.device).view(n, 1, 1) - 1) * C + torch.arange(2 * C, device=q.device)
    docp = torch.cat([doc, doc.new_full((Lp - L,), -1)])
    kin = (kpos >= 0) & (kpos < L)
    kdoc = docp[kpos.clamp(0, Lp - 1)]
    valid = kin & (kpos <= qpos) & (kpos > qpos - window) & (kdoc == docp[qpos])  # (n, C, 2C)
    valid = valid.expand(B, 1, n, C, 2 * C)
    if pad is not None:
        kpad = F.pad(pad, (C, Lp - L), value=True)[:, :, kpos + C]  # (B, 1, n, C, 2C)
        valid = valid & ~kpad
    scores = scores.masked_fill(~valid, float("-inf")).view(B, H, Lp, 2 * C)[:, :, :L]

    def weighted(p: torch.Tensor) -> torch.Tensor:  # (B, H, L, 2C) -> Σ p [v, 1] per query, chunk by chunk
        p = F.pad(p, (0, 0, 0, Lp - L)).view(B, H, n, C, 2 * C)
        return (p @ v2).view(B, H, Lp, -1)[:, :, :L]

    y = _combine(num_f, lam, scores, weighted)
    return y.to(out_dtype)


def _causal_sums(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Σ_{j≤i, same document} (Q_i·K_j) V_j on (B, H, L, ·) via the causal scan (``causal._linear_op``)."""
    B, H, L, m = Q.shape
    T, group = _sizes(L, None, 4096, B * H, m, Q.device)
    pad = -L % group
    Lp = L + pad
    doc = _document_ids(cu_seqlens, L, Lp, Q.device)
    Q, K, V = (F.pad(t, (0, 0, 0, pad)).reshape(B * H, Lp, t.shape[-1]) for t in (Q, K, V))
    o = _linear_op(Q, K, V, doc, T, group)[0]
    return o.view(B, H, Lp, -1)[:, :, :L]


@dataclass
class WindowState:
    """Decoding state of the hybrid: the FAVOR sums of keys that left the window and the last W keys.

    kv: (B, H, m, e+1) Σ_j exp(ℓ(k_j) − g) [v_j, 1] over keys that left the window; g: (B, H) their running max
    logit (_NEG before the first); k, v, kl: (B, H, w ≤ W, ·) the window's keys, values and key logits (a key's
    logits enter kv when it leaves); position: tokens consumed (host int).
    """

    kv: torch.Tensor
    g: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kl: torch.Tensor
    position: int = 0

    @staticmethod
    def zeros(batch: int, heads: int, num_features: int, head_dim: int, value_dim: int, device=None,
              dtype=torch.float32) -> WindowState:
        """Empty state for a (batch, heads) decoder with m features."""
        kw = dict(dtype=dtype, device=device)
        return WindowState(kv=torch.zeros(batch, heads, num_features, value_dim + 1, **kw),
                           g=torch.full((batch, heads), _NEG, **kw),
                           k=torch.zeros(batch, heads, 0, head_dim, **kw),
                           v=torch.zeros(batch, heads, 0, value_dim, **kw),
                           kl=torch.zeros(batch, heads, 0, num_features, **kw))


@_float32_region
def window_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, q_logits: torch.Tensor,
                k_logits: torch.Tensor, shift: torch.Tensor, window: int,
                state: WindowState) -> tuple[torch.Tensor, WindowState]:
    """One decoding step of :func:`window_attention`: q_t, k_t (B, H, 1, d), v_t (B, H, 1, e), logits (B, H, 1, m),
    shift (B, H, 1) -> (y_t (B, H, 1, e), new state); equals the full forward's row t (up to rounding)."""
    out_dtype = _autocast_dtype(q_t) or v_t.dtype
    acc = _acc(q_t)
    q_t, k_t, v_t, ql, kl, shift = (t.to(acc) for t in (q_t, k_t, v_t, q_logits, k_logits, shift))
    ks, vs, kls = (torch.cat([a.to(acc), b], dim=2) for a, b in ((state.k, k_t), (state.v, v_t), (state.kl, kl)))
    kv, g = state.kv.to(acc), state.g.to(acc)
    if ks.shape[2] > window:  # the oldest key leaves the window and joins the FAVOR state
        old, v_old = kls[:, :, :1], _values_with_ones(vs[:, :, :1], None)
        g_new = torch.maximum(g, old.amax(dim=(-1, -2)))
        kv = kv * torch.exp(g - g_new)[..., None, None] + torch.exp(old - g_new[..., None, None]).mT @ v_old
        g = g_new
        ks, vs, kls = ks[:, :, 1:], vs[:, :, 1:], kls[:, :, 1:]
    cq = ql.amax(-1)
    num_f = torch.exp(ql - cq.unsqueeze(-1)) @ kv  # (B, H, 1, e+1)
    lam = cq + g.unsqueeze(-1) - math.log(ql.shape[-1]) + shift
    scores = q_t @ ks.transpose(-1, -2) / math.sqrt(q_t.shape[-1])  # (B, H, 1, w)
    v1 = _values_with_ones(vs, None)
    y = _combine(num_f, lam, scores, lambda p: p @ v1)
    return y.to(out_dtype), WindowState(kv=kv, g=g, k=ks, v=vs, kl=kls, position=state.position + 1)
