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

Mixed precision: under torch.autocast (bf16/fp16, CUDA or CPU) every public entry point and the backward of
every custom Function runs in an autocast-disabled region on float32 copies of its inputs (the exp of the
features, the prefix sums and the normalisers would lose the attention signal in 8 mantissa bits), and the
result is returned in the autocast dtype, as autocast returns a matmul's. Outside autocast the result has v's
dtype. float64 inputs stay float64 (gradient checks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SOFTMAX_EPS = 1e-6  # reference value; performer-pytorch's 1e-4 collapses sharp attention towards the mean
RELU_EPS = 1e-3
_NEG = -1e30  # finite "minus infinity" for stabilisers (keeps exp(a - b) free of inf - inf)
KERNELS = ("softmax", "relu")
ROW_BLOCK_ELEMENTS = 1 << 19  # CPU feature block: N·rows·m floats (see _row_block)


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


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast would give a matmul on t's device, or None when autocast is off there."""
    device = t.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _float32_region(fn: Callable) -> Callable:
    """Run fn with autocast disabled on the device of its first tensor argument.

    torch.amp.custom_fwd/custom_bwd would do this for one device type fixed at decoration time; FAVOR+ runs
    on CPU and CUDA alike, so the region is opened for whichever device the tensors are on.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


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
# softmax kernel, fused: custom autograd Functions that keep only φ(Q), φ(K) (L·m each) for backward
#
# x·ωᵢ d^(-1/4) − ‖x‖² d^(-1/2)/2 is one matmul of [x, ‖x‖²] with [P d^(-1/4), −d^(-1/2)/2]; the stabiliser
# and exp run in place on its output, and the +ε of φ is applied as a rank-1 correction of the small
# (m, e) products instead of a pass over the (L, m) features.


def _augmented_projection(P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[P d^(-1/4), −d^(-1/2)/2]: (m, d+1)."""
    d = P.shape[1]
    col = torch.full((P.shape[0], 1), -0.5 * d**-0.5, dtype=dtype, device=P.device)
    return torch.cat([P.to(dtype) * d**-0.25, col], dim=1)


def _logits(x: torch.Tensor, Pa: torch.Tensor) -> torch.Tensor:
    """ω·x' − ‖x'‖²/2 for x (N, L, d) -> (N, L, m) via one GEMM."""
    xa = torch.cat([x, (x * x).sum(-1, keepdim=True)], dim=-1)  # (N, L, d+1)
    return xa @ Pa.T


def _logits_backward(dlogits: torch.Tensor, x: torch.Tensor, Pa: torch.Tensor) -> torch.Tensor:
    """Gradient of _logits wrt x: (N, L, m) -> (N, L, d)."""
    dxa = dlogits @ Pa  # (N, L, d+1)
    return dxa[..., :-1] + 2 * x * dxa[..., -1:]


def _values_with_ones(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[v, 1] with padded rows zeroed; the ones column carries the normaliser. (N, L, e) -> (N, L, e+1)"""
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return v1 if mask is None else v1.masked_fill_(mask.unsqueeze(-1), 0.0)


def _normaliser_backward(grad: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """out = num / den: gradient wrt [num, den], (N, L, e) -> (N, L, e+1)."""
    return torch.cat([grad, -(grad * out).sum(-1, keepdim=True)], dim=-1) / den


def _row_block(N: int, L: int, m: int, device: torch.device) -> int:
    """Rows per block of the blocked feature passes, chosen by the shapes. On a CPU, N·rows·m floats (a block's
    features for all heads) take about 2 MiB, so a block stays in cache from its GEMM to its last use and the
    (L, m) features cross memory once each way; a GPU takes the whole length as one block (there, kernel
    launches cost more than the passes)."""
    if device.type != "cpu":
        return max(L, 1)
    return max(64, min(max(L, 1), ROW_BLOCK_ELEMENTS // max(N * m, 1)))


class _SoftmaxNoncausal(torch.autograd.Function):
    """FAVOR+ noncausal softmax attention on flattened (N = B·H) inputs in the accumulation dtype.

    Features are built in row blocks, each used while it is in cache. Per query row, softmax(ωᵀq') equals
    exp(ωᵀq' − ‖q'‖²/2 − c_q) up to a row scale 1/S (S = Σ_f of the stabilised exp), and a row scale of φ(q)
    cancels in the ratio if the ε floor scales with it: φ(q)/S = p + ε·max_f p. Per key, exp(ωᵀk' − ‖k'‖²/2 − C)
    = p_k · w with one weight w per key, which multiplies the (L, e+1) values instead of the (L, m) features.
    So one fused softmax replaces the bias, max, subtract and exp passes, and the result is exactly the
    stabilised φ of the reference (stabilisers constant in the backward pass, as before).
    """

    @staticmethod
    @_float32_region
    def forward(ctx, q, k, v, P, mask):
        N, Lq, _ = q.shape
        Lk, m = k.shape[1], P.shape[0]
        Pa = _augmented_projection(P, q.dtype)  # (m, d+1); column d holds −d^(-1/2)/2 for the ‖x‖² term
        Ps = Pa[:, :-1].contiguous()
        rows = _row_block(N, max(Lq, Lk), m, q.device)
        v1 = _values_with_ones(v, mask)  # (N, Lk, e+1), padded rows zero
        # keys: p_k blocks, log w (relative to the running max C; rescaled at the end), kv = Σ p_kᵀ (w v1)
        pk, logw = [], k.new_empty(N, Lk, 1)
        C = k.new_full((N, 1, 1), _NEG)
        kv = k.new_zeros(N, m, v1.shape[-1])
        for a in range(0, Lk, rows):
            kb = k[:, a : a + rows]
            y = kb @ Ps.T  # (N, r, m): ω·k'
            top, idx = y.max(-1, keepdim=True)
            pb = torch.softmax(y, -1)
            pk.append(pb)
            top = top + (kb * kb).sum(-1, keepdim=True) * Pa[0, -1]  # the row's largest logit ω·k' − ‖k'‖²/2
            lw = top - pb.gather(-1, idx).log()  # log Σ_f exp(logit): p·exp(lw) = exp(logit)
            if mask is not None:
                pad = mask[:, a : a + rows, None]
                top, lw = top.masked_fill(pad, _NEG), lw.masked_fill(pad, float("-inf"))
            C_new = torch.maximum(C, top.amax(1, keepdim=True))
            kv.mul_(torch.exp(C - C_new))
            C = C_new
            kv.baddbmm_(pb.transpose(-1, -2), torch.exp(lw - C) * v1[:, a : a + rows])
            logw[:, a : a + rows] = lw
        logw.sub_(C)  # w = exp(logw) ≤ m, and φ(k) − ε = p_k·w ≤ 1
        kv.add_(SOFTMAX_EPS * v1.sum(1, keepdim=True))  # the ε floor of φ(k) on real keys
        kv_sum = kv.sum(1, keepdim=True)  # (N, 1, e+1): what the ε floor of φ(q) sees
        # queries: o = (p_q + ε max p_q) kv, blocks
        pq, pq_max = [], q.new_empty(N, Lq, 1)
        out, den = q.new_empty(N, Lq, v.shape[-1]), q.new_empty(N, Lq, 1)
        for a in range(0, Lq, rows):
            pb = torch.softmax(q[:, a : a + rows] @ Ps.T, -1)
            pm = pb.amax(-1, keepdim=True)
            o = torch.baddbmm(SOFTMAX_EPS * pm * kv_sum, pb, kv)  # (N, r, e+1)
            d_b = o[..., -1:].clamp_min(1e-30)  # a query that sees no key at all gets 0
            torch.div(o[..., :-1], d_b, out=out[:, a : a + rows])
            den[:, a : a + rows], pq_max[:, a : a + rows] = d_b, pm
            pq.append(pb)
        ctx.save_for_backward(q, k, v1, kv, out, den, pq_max, logw, Pa, mask, *pq, *pk)
        ctx.blocks = (rows, len(pq))
        return out

    @staticmethod
    @_float32_region
    def backward(ctx, grad):
        q, k, v1, kv, out, den, pq_max, logw, Pa, mask, *blocks = ctx.saved_tensors
        rows, nq = ctx.blocks
        pq, pk = blocks[:nq], blocks[nq:]
        do = _normaliser_backward(grad, out, den)  # (N, Lq, e+1)
        dq = torch.empty_like(q)
        dkv = SOFTMAX_EPS * (pq_max * do).sum(1, keepdim=True).expand_as(kv).clone()  # via the ε floor of φ(q)
        for i, pb in enumerate(pq):
            a = i * rows
            dob = do[:, a : a + rows]
            dkv.baddbmm_(pb.transpose(-1, -2), dob)
            dlogits = (dob @ kv.transpose(-1, -2)).mul_(pb)  # stabiliser and row scale are constants
            dq[:, a : a + rows] = _logits_backward(dlogits, q[:, a : a + rows], Pa)
        dk, dv = torch.empty_like(k), torch.empty_like(v1[..., :-1])
        w = logw.exp()  # (N, Lk, 1), 0 on padded keys
        dv_eps = SOFTMAX_EPS * dkv.sum(1, keepdim=True)  # (N, 1, e+1) via the ε floor of φ(k)
        for i, pb in enumerate(pk):
            a = i * rows
            wv = w[:, a : a + rows] * v1[:, a : a + rows]
            dlogits = (wv @ dkv.transpose(-1, -2)).mul_(pb)
            dk[:, a : a + rows] = _logits_backward(dlogits, k[:, a : a + rows], Pa)
            dvb = (pb @ dkv).mul_(w[:, a : a + rows]).add_(dv_eps)
            dv[:, a : a + rows] = dvb[..., :-1]
        if mask is not None:
            dv.masked_fill_(mask.unsqueeze(-1), 0.0)
        return dq, dk, dv, None, None


# -----------------------------------------------------------------------------
# causal core: o_i = Σ_{j≤i} (Q_i·K_j) exp(g_j − g_i) V_j with g nondecreasing (the running key max)
#
# Chunks of T positions: inside a chunk a masked (T, T) quadratic; across chunks a running (m, e) state
# H = Σ_j K_j exp(g_j − G) V_jᵀ kept relative to G, the g at the end of the previous chunk. All chunks of
# a group of positions are computed at once (big batched GEMMs); only the (m, e) state is scanned
# sequentially. Backward recomputes each group from its saved entering state (one (m, e) per group), so
# nothing of size L·m·e or L·T·(all groups) is stored: memory O(L·m + m·e) per head.


def _chunk_scales(gc: torch.Tensor, g_prev: torch.Tensor):
    """gc: (N, n, T) running max per position; g_prev: (N,) the g before the group.

    Returns the intra-chunk decay-and-mask D (N, n, T, T) [i, j] = exp(g_j − g_i)·[j ≤ i], the chunk
    start/end references G0, G1 (N, n) and the row scales exp(g_j − G1) (key side) and exp(G0 − g_i)
    (query side), all ≤ 1.
    """
    T = gc.shape[-1]
    tril = torch.ones(T, T, dtype=torch.bool, device=gc.device).tril()
    D = torch.exp((gc.unsqueeze(-2) - gc.unsqueeze(-1)).clamp_max_(0.0)).mul_(tril)
    G1 = gc[..., -1]
    G0 = torch.cat([g_prev.unsqueeze(1), G1[:, :-1]], dim=1)
    return D, G0, G1, torch.exp(gc - G1.unsqueeze(-1)), torch.exp(G0.unsqueeze(-1) - gc)


def _chunk_states(K, Vk, G0, G1, H, g_prev):
    """States entering each chunk of a group, (N, n, m, e), and the state leaving it.

    H_c = Σ_{c' < c} exp(G1[c'] − G0[c]) kv_c' + exp(g_prev − G0[c]) H: the sequential scan over chunks
    written as one small (n, n) weight matrix (all weights ≤ 1), so it is a single batched GEMM.
    """
    N, n = G0.shape
    kv = K.transpose(-1, -2) @ Vk  # (N, n, m, e): each chunk's keys, relative to its own end G1
    strict = torch.ones(n, n, dtype=torch.bool, device=K.device).tril(-1)
    W = torch.exp((G1.unsqueeze(1) - G0.unsqueeze(2)).clamp_max_(0.0)).mul_(strict)  # (N, n, n) [c, c']
    Hc = W @ kv.view(N, n, -1)  # (N, n, m·e)
    Hc.baddbmm_(torch.exp(g_prev.unsqueeze(1) - G0).unsqueeze(-1), H.view(N, 1, -1))  # + the incoming state
    Hc = Hc.view_as(kv)
    last = G1[:, -1:]  # the state leaving the group is relative to the group's last g
    H_out = (torch.exp(G1 - last).unsqueeze(1) @ kv.view(N, n, -1)).view_as(H)
    H_out.add_(torch.exp(g_prev.unsqueeze(1) - last)[..., None] * H)
    return Hc, H_out


def _future_states(qdo, G0, G1, U, g_prev):
    """Reverse scan of the backward pass: for each chunk c, U_c = Σ over queries in later chunks and later
    groups of exp(G1[c] − g_i) Q_iᵀ dO_i; qdo (N, n, m, e) holds each chunk's own sum relative to G0.
    U enters relative to the group's last g and leaves relative to g_prev. All weights ≤ 1."""
    N, n = G0.shape
    strict = torch.ones(n, n, dtype=torch.bool, device=qdo.device).triu(1)
    W = torch.exp((G1.unsqueeze(2) - G0.unsqueeze(1)).clamp_max_(0.0)).mul_(strict)  # (N, n, n) [c, c']
    last = G1[:, -1:]
    Uc = W @ qdo.view(N, n, -1)  # (N, n, m·e)
    Uc.baddbmm_(torch.exp(G1 - last).unsqueeze(-1), U.view(N, 1, -1))
    Uc = Uc.view_as(qdo)
    U_out = (torch.exp(g_prev.unsqueeze(1) - G0).unsqueeze(1) @ qdo.view(N, n, -1)).view_as(U)
    U_out.add_(torch.exp(g_prev.unsqueeze(1) - last)[..., None] * U)
    return Uc, U_out


def _to_groups(x: torch.Tensor, G: int) -> torch.Tensor:
    """(N, L, ...) -> (L/G, N, G, ...) contiguous: a group's chunks then merge with N into one bmm batch."""
    return x.unflatten(1, (x.shape[1] // G, G)).transpose(0, 1).contiguous()


def _group_view(x: torch.Tensor, G: int) -> torch.Tensor:
    """(N, L, ...) -> (L/G, N, G, ...) as a view (no copy; for tensors only read group by group)."""
    return x.unflatten(1, (x.shape[1] // G, G)).transpose(0, 1)


def _from_groups(x: torch.Tensor) -> torch.Tensor:
    """(L/G, N, G, ...) -> (N, L, ...)."""
    return x.transpose(0, 1).flatten(1, 2)


def _prefix_sum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive cumsum over positions in group layout (ng, N, G, e)."""
    tot = x.sum(2, keepdim=True)  # (ng, N, 1, e)
    return x.cumsum(2) + (tot.cumsum(0) - tot)


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive reverse cumsum over positions in group layout (ng, N, G, e)."""
    tot = x.sum(2, keepdim=True)
    return (x - x.cumsum(2)).add_(tot + (tot.sum(0) - tot.cumsum(0)))


def _causal_forward(Q, K, V, g, T):
    """Q, K: (ng, N, G, m); V: (ng, N, G, e); g: (ng, N, G); G % T == 0 (group-major layout).

    Returns O (ng, N, G, e) and the states entering each group (ng, N, m, e) for the backward pass.
    """
    ng, N, G, m = Q.shape
    e, n = V.shape[-1], G // T
    O = torch.empty_like(V)
    Hs = Q.new_empty(ng, N, m, e)
    H = Q.new_zeros(N, m, e)
    for gi in range(ng):
        Qc, Kc, Vc, gc = Q[gi].view(N, n, T, m), K[gi].view(N, n, T, m), V[gi].view(N, n, T, e), g[gi].view(N, n, T)
        g_prev = g[gi - 1, :, -1] if gi > 0 else g.new_full((N,), _NEG)
        D, G0, G1, wk, wq = _chunk_scales(gc, g_prev)
        Hs[gi] = H
        Hc, H = _chunk_states(Kc, Vc * wk.unsqueeze(-1), G0, G1, H, g_prev)
        Oc = O[gi].view(N, n, T, e)
        torch.matmul((Qc @ Kc.transpose(-1, -2)).mul_(D), Vc, out=Oc)  # intra-chunk
        Oc.add_((Qc @ Hc).mul_(wq.unsqueeze(-1)))  # earlier chunks
    return O, Hs


def _causal_backward(Q, K, V, g, Hs, dO, T, finish=None):
    """Gradients of _causal_forward wrt Q, K, V (g is a constant), group by group from the end.

    Returns (dQ, dK, dV); with ``finish``, each group's dQ, dK (N, G, m) go to ``finish(gi, dQg, dKg)`` as soon as
    they are complete and only dV is returned, so no (L, m) gradient is ever held whole.
    """
    ng, N, G, m = Q.shape
    e, n = V.shape[-1], G // T
    dV = torch.empty_like(V)
    if finish is None:
        dQ, dK = torch.empty_like(Q), torch.empty_like(K)
    U = Q.new_zeros(N, m, e)  # Σ over later queries exp(G − g_i) Q_iᵀ dO_i, G = g at the group's end
    for gi in reversed(range(ng)):
        Qc, Kc, Vc, gc = Q[gi].view(N, n, T, m), K[gi].view(N, n, T, m), V[gi].view(N, n, T, e), g[gi].view(N, n, T)
        dOc = dO[gi].view(N, n, T, e)
        g_prev = g[gi - 1, :, -1] if gi > 0 else g.new_full((N,), _NEG)
        D, G0, G1, wk, wq = _chunk_scales(gc, g_prev)
        Vk = Vc * wk.unsqueeze(-1)
        Hc, _ = _chunk_states(Kc, Vk, G0, G1, Hs[gi], g_prev)
        dQg, dKg = (dQ[gi], dK[gi]) if finish is None else (torch.empty_like(Q[gi]), torch.empty_like(K[gi]))
        dQc, dKc, dVc = dQg.view(N, n, T, m), dKg.view(N, n, T, m), dV[gi].view(N, n, T, e)
        # intra-chunk
        S = (Qc @ Kc.transpose(-1, -2)).mul_(D)  # (N, n, T, T)
        torch.matmul(S.transpose(-1, -2), dOc, out=dVc)
        del S
        dP = (dOc @ Vc.transpose(-1, -2)).mul_(D)
        torch.matmul(dP, Kc, out=dQc)
        torch.matmul(dP.transpose(-1, -2), Qc, out=dKc)
        del dP
        # earlier chunks seen by these queries
        dOq = dOc * wq.unsqueeze(-1)  # (N, n, T, e)
        dQc.add_(dOq @ Hc.transpose(-1, -2))
        # later queries seen by these keys
        Uc, U = _future_states(Qc.transpose(-1, -2) @ dOq, G0, G1, U, g_prev)
        dKc.add_(Vk @ Uc.transpose(-1, -2))
        dVc.add_((Kc @ Uc).mul_(wk.unsqueeze(-1)))
        if finish is not None:
            finish(gi, dQg, dKg)
    return dV if finish is not None else (dQ, dK, dV)


class _SoftmaxCausal(torch.autograd.Function):
    """FAVOR+ causal softmax attention on flattened (N, L, ·) inputs, L % group == 0, group % chunk == 0."""

    @staticmethod
    @_float32_region
    def forward(ctx, q, k, v, P, mask, chunk, group):
        Pa = _augmented_projection(P, q.dtype)
        q, k, v = (_group_view(t, group) for t in (q, k, v))  # (ng, N, G, ·) views: q, k are saved, not copied
        mask = None if mask is None else _to_groups(mask, group)
        Q = _logits(q, Pa)  # (ng, N, G, m)
        Q.sub_(Q.amax(-1, keepdim=True)).exp_().add_(SOFTMAX_EPS)  # φ(q) up to m^(-1/2)
        K = _logits(k, Pa)
        if mask is not None:
            K.masked_fill_(mask.unsqueeze(-1), float("-inf"))
        # running key max over positions (never a future key)
        g = _to_groups(_from_groups(K.amax(-1)).cummax(-1).values.clamp_min_(_NEG), group)  # (ng, N, G)
        K.sub_(g.unsqueeze(-1)).exp_()  # ≤ 1
        V = _values_with_ones(v, mask)  # (ng, N, G, e+1)
        O, Hs = _causal_forward(Q, K, V, g, chunk)
        # ε floor of φ(k_j): Σ_{j≤i} ε (Σ_f φ(q_i)_f) v_j
        O.addcmul_(Q.sum(-1, keepdim=True), _prefix_sum(V), value=SOFTMAX_EPS)
        den = O[..., -1:].clamp_min(1e-30)
        out = O[..., :-1] / den
        ctx.save_for_backward(q, k, Q, K, V, g, Hs, out, den, Pa, mask)
        ctx.chunk = chunk
        return _from_groups(out)

    @staticmethod
    @_float32_region
    def backward(ctx, grad):
        q, k, Q, K, V, g, Hs, out, den, Pa, mask = ctx.saved_tensors
        dO = _normaliser_backward(_to_groups(grad, out.shape[2]), out, den)  # (ng, N, G, e+1)
        C = _prefix_sum(V)  # ε term: o_i += ε s_i C_i with s = Σ_f Q_if and C = prefix sums of V
        dq, dk = torch.empty_like(q), torch.empty_like(k)

        def finish(gi, dQg, dKg):  # a group's feature gradients -> its input gradients, while they are in cache
            dQg.add_(SOFTMAX_EPS * (dO[gi] * C[gi]).sum(-1, keepdim=True))
            dq[gi] = _logits_backward(dQg.mul_(Q[gi] - SOFTMAX_EPS), q[gi], Pa)  # d/d logits = dQ ⊙ (Q − ε)
            dk[gi] = _logits_backward(dKg.mul_(K[gi]), k[gi], Pa)

        dV = _causal_backward(Q, K, V, g, Hs, dO, ctx.chunk, finish)
        C = None  # free the prefix sums before the suffix sums
        dV.add_(_suffix_sum(dO.mul_(Q.sum(-1, keepdim=True))), alpha=SOFTMAX_EPS)  # dO is not needed after this
        dv = dV[..., :-1]
        if mask is not None:
            dv = dv.masked_fill(mask.unsqueeze(-1), 0.0)
        return _from_groups(dq), _from_groups(dk), _from_groups(dv), None, None, None, None


class _CausalLinear(torch.autograd.Function):
    """o_i = Σ_{j≤i} (Q_i·K_j) V_j for given features (the relu kernel; no stabiliser); (N, L, ·) inputs."""

    @staticmethod
    @_float32_region
    def forward(ctx, Q, K, V, chunk, group):
        Q, K, V = (_to_groups(t, group) for t in (Q, K, V))
        g = Q.new_zeros(Q.shape[:-1])
        O, Hs = _causal_forward(Q, K, V, g, chunk)
        ctx.save_for_backward(Q, K, V, g, Hs)
        ctx.chunk = chunk
        return _from_groups(O)

    @staticmethod
    @_float32_region
    def backward(ctx, dO):
        Q, K, V, g, Hs = ctx.saved_tensors
        dQ, dK, dV = _causal_backward(Q, K, V, g, Hs, _to_groups(dO, Q.shape[2]), ctx.chunk)
        return _from_groups(dQ), _from_groups(dK), _from_groups(dV), None, None


@_float32_region
def _favor_noncausal(q, k, v, P, kernel, key_padding_mask) -> torch.Tensor:
    B, H = q.shape[:2]
    acc = _acc(q)
    if kernel == "softmax":
        flat = [t.to(acc).reshape(B * H, t.shape[2], t.shape[3]) for t in (q, k, v)]  # (N, L, ·)
        mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)
        return _SoftmaxNoncausal.apply(*flat, P.to(acc), mask).view(B, H, q.shape[2], v.shape[3])
    qf, kf = _query_features(q, P, kernel), _query_features(k, P, kernel)  # (B, H, L, m)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    kv = kf.transpose(-1, -2) @ _masked_values(v, None)  # (B, H, m, e+1)
    return _normalise(qf @ kv)


def _chunk_for(m: int, e: int, group: int) -> int:
    """Causal chunk length by shape: per position the masked intra-chunk products cost ∝ T·(m + e) and forming the
    states entering the n = group/T chunks of a group ∝ group·m·e/T², so T ≈ (2·group·m·e/(m + e))^(1/3), rounded to
    a power of two in [16, 256] (m = 256, e = 65, group 4096: T = 64; measured 3.37 s vs 3.59 s for T = 128 at
    L = 8192, fwd+bwd, 8 heads, one thread)."""
    t = (2 * group * m * e / (m + e)) ** (1 / 3)
    return int(min(256, max(16, 2 ** round(math.log2(t)))))


@_float32_region
def _favor_causal(q, k, v, P, kernel, key_padding_mask, chunk_size, group_size) -> torch.Tensor:
    B, H, L, _ = q.shape
    if chunk_size is None:
        m = P.shape[0] if P is not None else q.shape[-1]
        chunk_size = _chunk_for(m, v.shape[-1] + 1, group_size)
    T = max(1, min(chunk_size, L))
    n_chunks = -(-L // T)
    n_groups = -(-n_chunks // max(1, group_size // T))
    group = T * -(-n_chunks // n_groups)  # equal groups of whole chunks; pads fewer than n_groups·T rows
    pad = n_groups * group - L
    if pad:  # right-pad to a whole number of chunks; padded keys come last so they reach no real query
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        mask = key_padding_mask if key_padding_mask is not None else q.new_zeros(B, L, dtype=torch.bool)
        key_padding_mask = torch.nn.functional.pad(mask, (0, pad), value=True)
    Lp, acc = L + pad, _acc(q)
    if kernel == "softmax":
        flat = [t.to(acc).reshape(B * H, Lp, t.shape[3]) for t in (q, k, v)]  # (N, L, ·)
        mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)
        out = _SoftmaxCausal.apply(*flat, P.to(acc), mask, T, group).view(B, H, Lp, v.shape[3])
        return out[:, :, :L]
    qf, kf = _query_features(q, P, kernel), _query_features(k, P, kernel)  # (B, H, L, m)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    v1 = _masked_values(v, key_padding_mask)
    m, e = qf.shape[-1], v1.shape[-1]
    o = _CausalLinear.apply(qf.reshape(B * H, Lp, m), kf.reshape(B * H, Lp, m), v1.reshape(B * H, Lp, e), T, group)
    return _normalise(o.view(B, H, Lp, e)[:, :, :L])


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
    chunk_size: int | None = None,
    group_size: int = 4096,
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
        chunk_size: causal chunk length T (does not change the result; cost ∝ L·T·m inside chunks); None = chosen
            by the shapes (see ``_chunk_for``).
        group_size: causal positions processed per batched step (memory/speed knob, result unchanged).
    Returns:
        (B, H, Lq, e) computed in float32; returned in the autocast dtype inside torch.autocast, else in v's dtype.
    """
    _check_inputs(q, k, v, P, kernel, causal, key_padding_mask)
    out_dtype = _autocast_dtype(q) or v.dtype
    if causal:
        out = _favor_causal(q, k, v, P, kernel, key_padding_mask, chunk_size, group_size)
    else:
        out = _favor_noncausal(q, k, v, P, kernel, key_padding_mask)
    return out.to(out_dtype)


@dataclass
class FavorState:
    """Decoding state per (batch, head): O(m·e) regardless of how many tokens were consumed.

    kv: (B, H, m, e+1) Σ_j exp(x_j − g) [v_j, 1] relative to the running max g; vsum: (B, H, e+1) Σ_j [v_j, 1]
    (carries the ε floor); g: (B, H) running key max (_NEG before the first key; 0 for kernel="relu");
    position: tokens consumed so far, a host-side int (reading it from a tensor would sync the device every step).
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
        (None = empty).
    Returns:
        (out_t (B, H, 1, e), new state). Constant time and memory per token. The state is float32 (float64 for
        float64 inputs); out_t has the autocast dtype inside torch.autocast, else v_t's dtype.
    """
    _check_inputs(q_t, k_t, v_t, P, kernel, True, None)
    if q_t.shape[2] != 1:
        raise ValueError(f"favor_step takes one token, got length {q_t.shape[2]}")
    out_dtype = _autocast_dtype(q_t) or v_t.dtype
    out, state = _favor_step(q_t, k_t, v_t, P, state, kernel)
    return out.to(out_dtype), state


@_float32_region
def _favor_step(q_t, k_t, v_t, P, state, kernel) -> tuple[torch.Tensor, FavorState]:
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
    return _normalise(out), FavorState(kv=kv, vsum=vsum, g=g, position=state.position + 1)
