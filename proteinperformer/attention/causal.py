"""Causal FAVOR+ as a chunked scan: out_i = φ(q_i)·S_i / φ(q_i)·z_i with S_i = Σ_{j≤i} φ(k_j)[v_j, 1]ᵀ.

A naive cumsum materialises L·m·e (performer-pytorch's CPU path: 9.6 GiB at 16k); chunks need O(L·m + m·e).
Positive random features (kernel "softmax") take a fused autograd Function with the running key stabiliser;
every other feature map goes through its ``features`` and the same scan with no stabiliser (_CausalLinear).
"""

from __future__ import annotations

import math

import torch

from .features import _NEG, SOFTMAX_EPS, FeatureMap, PositiveRandomFeatures
from .normaliser import _NO_KEY, _normalise, _normaliser_backward, _values_with_ones
from .precision import _acc, _float32_region

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
        Pa = PositiveRandomFeatures.augmented_projection(P, q.dtype)
        q, k, v = (_group_view(t, group) for t in (q, k, v))  # (ng, N, G, ·) views: q, k are saved, not copied
        mask = None if mask is None else _to_groups(mask, group)
        Q = PositiveRandomFeatures.augmented_logits(q, Pa)  # (ng, N, G, m)
        Q.sub_(Q.amax(-1, keepdim=True)).exp_().add_(SOFTMAX_EPS)  # φ(q) up to m^(-1/2)
        K = PositiveRandomFeatures.augmented_logits(k, Pa)
        if mask is not None:
            K.masked_fill_(mask.unsqueeze(-1), float("-inf"))
        # running key max over positions (never a future key)
        g = _to_groups(_from_groups(K.amax(-1)).cummax(-1).values.clamp_min_(_NEG), group)  # (ng, N, G)
        K.sub_(g.unsqueeze(-1)).exp_()  # ≤ 1
        V = _values_with_ones(v, mask)  # (ng, N, G, e+1)
        O, Hs = _causal_forward(Q, K, V, g, chunk)
        # ε floor of φ(k_j): Σ_{j≤i} ε (Σ_f φ(q_i)_f) v_j
        O.addcmul_(Q.sum(-1, keepdim=True), _prefix_sum(V), value=SOFTMAX_EPS)
        den = O[..., -1:].clamp_min(_NO_KEY)
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
            dQg.mul_(Q[gi] - SOFTMAX_EPS)  # d/d logits = dQ ⊙ (Q − ε)
            dq[gi] = PositiveRandomFeatures.augmented_logits_backward(dQg, q[gi], Pa)
            dk[gi] = PositiveRandomFeatures.augmented_logits_backward(dKg.mul_(K[gi]), k[gi], Pa)

        dV = _causal_backward(Q, K, V, g, Hs, dO, ctx.chunk, finish)
        C = None  # free the prefix sums before the suffix sums
        dV.add_(_suffix_sum(dO.mul_(Q.sum(-1, keepdim=True))), alpha=SOFTMAX_EPS)  # dO is not needed after this
        dv = dV[..., :-1]
        if mask is not None:
            dv = dv.masked_fill(mask.unsqueeze(-1), 0.0)
        return _from_groups(dq), _from_groups(dk), _from_groups(dv), None, None, None, None


class _CausalLinear(torch.autograd.Function):
    """o_i = Σ_{j≤i} (Q_i·K_j) V_j for given features (maps without a stabiliser); (N, L, ·) inputs."""

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


def _chunk_for(m: int, e: int, group: int) -> int:
    """Causal chunk length by shape: per position the masked intra-chunk products cost ∝ T·(m + e) and forming the
    states entering the n = group/T chunks of a group ∝ group·m·e/T², so T ≈ (2·group·m·e/(m + e))^(1/3), rounded to
    a power of two in [16, 256] (m = 256, e = 65, group 4096: T = 64; measured 3.37 s vs 3.59 s for T = 128 at
    L = 8192, fwd+bwd, 8 heads, one thread)."""
    t = (2 * group * m * e / (m + e)) ** (1 / 3)
    return int(min(256, max(16, 2 ** round(math.log2(t)))))


@_float32_region
def _favor_causal(q, k, v, P, fmap: FeatureMap, key_padding_mask, chunk_size, group_size) -> torch.Tensor:
    """(B, H, L, d), (B, H, L, d), (B, H, L, e) -> (B, H, L, e) in the accumulation dtype."""
    B, H, L, _ = q.shape
    if chunk_size is None:
        m = fmap.num_features(P, q.shape[-1])
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
    if isinstance(fmap, PositiveRandomFeatures):  # the fused path
        flat = [t.to(acc).reshape(B * H, Lp, t.shape[3]) for t in (q, k, v)]  # (N, L, ·)
        mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)
        out = _SoftmaxCausal.apply(*flat, P.to(acc), mask, T, group).view(B, H, Lp, v.shape[3])
        return out[:, :, :L]
    qf, kf = fmap.features(q, P), fmap.features(k, P)  # (B, H, L, m)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    v1 = _values_with_ones(v.to(_acc(v)), None if key_padding_mask is None else key_padding_mask[:, None])
    m, e = qf.shape[-1], v1.shape[-1]
    o = _CausalLinear.apply(qf.reshape(B * H, Lp, m), kf.reshape(B * H, Lp, m), v1.reshape(B * H, Lp, e), T, group)
    return _normalise(o.view(B, H, Lp, e)[:, :, :L])

