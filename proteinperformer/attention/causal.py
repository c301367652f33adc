"""Causal FAVOR+ as a chunked scan: out_i = φ(q_i)·S_i / φ(q_i)·z_i with S_i = Σ_{j≤i} φ(k_j)[v_j, 1]ᵀ.

A naive cumsum materialises L·m·e (performer-pytorch's CPU path: 9.6 GiB at 16k); chunks need O(L·m + m·e).
Positive random features (kernel "softmax") take a fused autograd Function with the running key stabiliser that
builds the features group by group, in the forward pass and again in the backward pass, so no (L, m) tensor is
ever held; every other feature map goes through its ``features`` and the same scan with no stabiliser
(_CausalLinear). Packed documents (``cu_seqlens``): the prefix sums, the state and the running key stabiliser all
restart at each document's first position, so every document gets exactly what it would get alone.
"""

from __future__ import annotations

import math

import torch

from .features import _NEG, SOFTMAX_EPS, FeatureMap, PositiveRandomFeatures
from .normaliser import _NO_KEY, _normalise, _normaliser_backward, _values_with_ones
from .precision import _acc, _float32_region

# causal core: o_i = Σ_{j≤i, same document} (Q_i·K_j) exp(g_j − g_i) V_j with g nondecreasing inside a document
# (the running key max; 0 for maps without a stabiliser).
#
# Positions are cut in chunks of T; inside a chunk a masked (T, T) quadratic; across chunks a state
# H = Σ_j K_j exp(g_j − G) V_jᵀ (m, e) kept relative to G, the g at the end of the previous chunk, and carried
# from chunk to chunk by one multiply-add (rescaled by exp(G_old − G_new) ≤ 1, zeroed where a document starts).
# A group of n chunks is computed at once in chunk-major layout (n, N, T, ·), so every product is one batched GEMM
# over n·N matrices; only the (m, e) state is scanned, chunk by chunk. Every exp(·) weight is ≤ 1. The backward
# pass recomputes each group from the state that entered it (one (N, m, e) per group is saved) and scans the
# state's gradient backwards the same way: memory O(L·(d + e) + G·m + m·e) per head.


def _chunked(x: torch.Tensor, T: int, G: int, gi: int) -> torch.Tensor:
    """Group ``gi`` of x (N, L, ·) in chunk-major layout (n, N, T, ·), n = G/T: a view, no copy."""
    N = x.shape[0]
    return x.view(N, -1, G // T, T, *x.shape[2:])[:, gi].transpose(0, 1)


def _running_max(x: torch.Tensor, doc: torch.Tensor, carry: torch.Tensor, carry_doc: torch.Tensor) -> torch.Tensor:
    """Running max of x (N, G) over positions that restarts where ``doc`` (G,) changes (Hillis–Steele doubling,
    log2(G) steps), continued from ``carry`` (N,) for positions in document ``carry_doc`` (0-d)."""
    G, s = x.shape[-1], 1
    while s < G:
        same = doc[s:] == doc[:-s]  # documents are contiguous: i and i − s in one document, so is all between
        x = torch.cat([x[:, :s], torch.where(same, torch.maximum(x[:, s:], x[:, :-s]), x[:, s:])], dim=1)
        s *= 2
    return torch.where(doc == carry_doc, torch.maximum(x, carry.unsqueeze(1)), x)


def _doc_cumsum(x: torch.Tensor, doc: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Inclusive sums of x (N, L, e) over positions within each document (doc (L,) nondecreasing), forward or
    (``reverse``) backward."""
    cs = x.cumsum(1)
    if reverse:  # Σ_{j ≥ i} = cs[end] − cs[i] + x[i]
        end = torch.searchsorted(doc, doc, right=True) - 1
        return cs.index_select(1, end).sub_(cs).add_(x)
    start = torch.searchsorted(doc, doc)  # Σ_{j ≤ i} = cs[i] − cs[start − 1]
    before = cs.index_select(1, (start - 1).clamp_min(0)).mul_((start > 0).to(x.dtype).unsqueeze(-1))
    return cs.sub_(before)


def _decays(g: torch.Tensor, doc: torch.Tensor, g_in: torch.Tensor, doc_in: torch.Tensor):
    """The weights of one group, all ≤ 1 and zero across documents. g (n, N, T): running max; doc (n, T);
    g_in (N,), doc_in (0-d): g and document of the position before the group.

    Returns D (n, N, T, T) [i, j] = exp(g_j − g_i)·[j ≤ i, same document] (intra-chunk), wq (n, N, T) = exp(G0 − g_i)
    (queries reading the entering state, relative to G0 = g before the chunk), wk (n, N, T) = exp(g_j − G1) (keys
    joining the state leaving the chunk, relative to G1 = g at its end) and a (n, N) = exp(G0 − G1) (state carried).
    """
    n, N, T = g.shape
    G1, doc1 = g[..., -1], doc[:, -1]  # (n, N), (n,)
    G0 = torch.cat([g_in.unsqueeze(0), G1[:-1]])
    doc0 = torch.cat([doc_in.view(1), doc1[:-1]])
    see = (doc.unsqueeze(-1) == doc.unsqueeze(-2)).tril_().unsqueeze(1)  # (n, 1, T, T)
    D = torch.exp((g.unsqueeze(-2) - g.unsqueeze(-1)).clamp_max_(0.0)).mul_(see)
    wq = torch.exp((G0.unsqueeze(-1) - g).clamp_max_(0.0)).mul_((doc == doc0.unsqueeze(-1)).unsqueeze(1))
    wk = torch.exp((g - G1.unsqueeze(-1)).clamp_max_(0.0)).mul_((doc == doc1.unsqueeze(-1)).unsqueeze(1))
    a = torch.exp((G0 - G1).clamp_max_(0.0)).mul_((doc0 == doc1).unsqueeze(-1))
    return D, wq, wk, a


def _states(kv: torch.Tensor, a: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The scan: S[0] = H, S[c+1] = a_c S[c] + kv_c; kv (n, N, m, e), a (n, N), H (N, m, e) -> S (n+1, N, m, e)."""
    S = kv.new_empty(kv.shape[0] + 1, *kv.shape[1:])
    S[0] = H
    for c in range(kv.shape[0]):
        torch.addcmul(kv[c], S[c], a[c, :, None, None], out=S[c + 1])
    return S


def _group_forward(Q, K, V, decays, H):
    """One group: Q, K (n, N, T, m), V (n, N, T, e), H (N, m, e) entering -> O (n, N, T, e), H leaving."""
    D, wq, wk, a = decays
    O = (Q @ K.transpose(-1, -2)).mul_(D) @ V  # intra-chunk
    S = _states(K.transpose(-1, -2) @ (V * wk.unsqueeze(-1)), a, H)
    O.add_((Q @ S[:-1]).mul_(wq.unsqueeze(-1)))  # earlier chunks
    return O, S[-1]


def _group_backward(Q, K, V, decays, H, dO, U):
    """Gradients of _group_forward wrt Q, K, V, given dO (n, N, T, e) and U (N, m, e), the gradient of the state
    leaving the group; returns dQ, dK (n, N, T, m), dV (n, N, T, e) and the gradient of the entering state."""
    D, wq, wk, a = decays
    Vk = V * wk.unsqueeze(-1)
    S = _states(K.transpose(-1, -2) @ Vk, a, H)  # the forward states, recomputed
    Sc = (Q @ K.transpose(-1, -2)).mul_(D)
    dV = Sc.transpose(-1, -2) @ dO
    dS = (dO @ V.transpose(-1, -2)).mul_(D)
    dQ, dK = dS @ K, dS.transpose(-1, -2) @ Q
    del Sc, dS
    dOq = dO * wq.unsqueeze(-1)
    dQ.add_(dOq @ S[:-1].transpose(-1, -2))
    # R[c] = d/dS[c] = a_c R[c+1] + Q_cᵀ dOq_c, backwards from R[n] = U
    qdo = Q.transpose(-1, -2) @ dOq  # (n, N, m, e)
    R = torch.empty_like(S)
    R[-1] = U
    for c in reversed(range(qdo.shape[0])):
        torch.addcmul(qdo[c], R[c + 1], a[c, :, None, None], out=R[c])
    dK.add_(Vk @ R[1:].transpose(-1, -2))
    dV.add_((K @ R[1:]).mul_(wk.unsqueeze(-1)))
    return dQ, dK, dV, R[0]


class _Groups:
    """Where the groups of a (N, L, ·) sequence are and what enters each: chunk T, group G, doc (L,) ids."""

    def __init__(self, L: int, T: int, G: int, doc: torch.Tensor):
        self.T, self.G, self.n_groups = T, G, L // G
        self.doc = doc.view(self.n_groups, G // T, T)  # (ng, n, T)

    def __call__(self, x: torch.Tensor, gi: int) -> torch.Tensor:
        return _chunked(x, self.T, self.G, gi)

    def doc_before(self, gi: int) -> torch.Tensor:
        """The document of the position before group gi (−1 before the first)."""
        return self.doc[gi - 1, -1, -1] if gi > 0 else self.doc.new_tensor(-1)


def _softmax_features(q, k, Pa, mask):
    """Positive random features of one group as row softmaxes: q, k (n, N, T, d), mask (n, N, T) or None ->

    p_q and its row max (n, N, T, 1): φ(q) = p_q / max p_q + ε, and the row scale max p_q cancels in the ratio;
    K (n, N, T, m) = p_k and the key's log Σ_f exp(ℓ_f) and max_f ℓ_f (n, N, T), so φ(k) − ε = K·exp(lse − c)
    for any stabiliser c; with p = softmax_f(ω·x') and ℓ = ω·x' − ‖x'‖²/2 (features.py). A padded key has
    lse = −inf and max −1e30.
    """
    Ps = Pa[:, :-1]
    pq = torch.softmax(q @ Ps.T, -1)
    y = k @ Ps.T
    top, idx = y.max(-1, keepdim=True)
    K = torch.softmax(y, -1)
    top = top.add_((k * k).sum(-1, keepdim=True) * Pa[0, -1]).squeeze(-1)  # the key's largest logit
    lse = top - K.gather(-1, idx).squeeze(-1).log()
    if mask is not None:
        top, lse = top.masked_fill(mask, _NEG), lse.masked_fill(mask, float("-inf"))
    return pq, pq.amax(-1, keepdim=True), K, lse, top


class _SoftmaxCausal(torch.autograd.Function):
    """FAVOR+ causal softmax attention on flattened (N, L, ·) inputs, L % group == 0, group % chunk == 0.

    Per key, φ(k_j) − ε relative to the stabiliser c_i = g_i equals p_j·exp(lse_j − g_j)·exp(g_j − g_i): the
    scalar u_j = exp(lse_j − g_j) ≤ m goes into the values and exp(g_j − g_i) is the core's decay. ε floors: φ(q)'s
    is in Q; φ(k)'s adds ε·(Σ_f Q_if)·Σ_{j≤i} [v_j, 1], a prefix sum of the values.
    """

    @staticmethod
    @_float32_region
    def forward(ctx, q, k, v, P, mask, doc, chunk, group):
        N, L, _ = q.shape
        Pa = PositiveRandomFeatures.augmented_projection(P, q.dtype)
        groups = _Groups(L, chunk, group, doc)
        v1 = _values_with_ones(v, mask)  # (N, L, e+1)
        O = v1.new_empty(v1.shape)
        g = q.new_empty(N, L)
        Hs = q.new_empty(groups.n_groups, N, P.shape[0], v1.shape[-1])  # the state entering each group
        H, g_in = q.new_zeros(Hs.shape[1:]), q.new_full((N,), _NEG)
        s = q.new_empty(N, L, 1)  # Σ_f Q_if
        for gi in range(groups.n_groups):
            mg = None if mask is None else groups(mask, gi)
            Q, qmax, K, lse, top = _softmax_features(groups(q, gi), groups(k, gi), Pa, mg)
            Q.add_(SOFTMAX_EPS * qmax)  # φ(q)·max p_q
            n, _, T = top.shape
            gg = _running_max(top.transpose(0, 1).reshape(N, -1), doc[gi * group : (gi + 1) * group], g_in,
                              groups.doc_before(gi))
            groups(g, gi).copy_(gg.view(N, n, T).transpose(0, 1))
            gc = groups(g, gi)
            V = groups(v1, gi) * torch.exp(lse - gc).unsqueeze(-1)
            Hs[gi] = H
            Og, H = _group_forward(Q, K, V, _decays(gc, groups.doc[gi], g_in, groups.doc_before(gi)), H)
            groups(O, gi).copy_(Og)
            groups(s, gi).copy_(Q.sum(-1, keepdim=True))
            g_in = gg[:, -1]
        O.addcmul_(s, _doc_cumsum(v1, doc), value=SOFTMAX_EPS)  # the ε floor of φ(k)
        den = O[..., -1:].clamp_min(_NO_KEY)
        out = O[..., :-1] / den
        ctx.save_for_backward(q, k, v1, g, s, Hs, out, den, Pa, mask, doc)
        ctx.chunk, ctx.group = chunk, group
        return out

    @staticmethod
    @_float32_region
    def backward(ctx, grad):
        q, k, v1, g, s, Hs, out, den, Pa, mask, doc = ctx.saved_tensors
        N, L, _ = q.shape
        groups = _Groups(L, ctx.chunk, ctx.group, doc)
        dO = _normaliser_backward(grad, out, den)  # (N, L, e+1)
        dqe = SOFTMAX_EPS * (dO * _doc_cumsum(v1, doc)).sum(-1, keepdim=True)  # via the ε floor of φ(k), per query
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv1 = _doc_cumsum(dO * s, doc, reverse=True).mul_(SOFTMAX_EPS)  # via the ε floor of φ(k), per value
        U = Hs.new_zeros(Hs.shape[1:])
        for gi in reversed(range(groups.n_groups)):
            qg, kg, gc = groups(q, gi), groups(k, gi), groups(g, gi)
            mg = None if mask is None else groups(mask, gi)
            p, qmax, K, lse, _ = _softmax_features(qg, kg, Pa, mg)  # recomputed
            u = torch.exp(lse - gc).unsqueeze(-1)
            V = groups(v1, gi) * u
            g_in = gc.new_full((N,), _NEG) if gi == 0 else groups(g, gi - 1)[-1, :, -1]
            decays = _decays(gc, groups.doc[gi], g_in, groups.doc_before(gi))
            dQ, dK, dV, U = _group_backward(p + SOFTMAX_EPS * qmax, K, V, decays, Hs[gi], groups(dO, gi), U)
            # d/d logits: φ(q) − ε = p_q up to the row scale, φ(k) − ε = p_k·u (u into V: dK carries it)
            dQ.add_(groups(dqe, gi)).mul_(p)
            groups(dq, gi).copy_(PositiveRandomFeatures.augmented_logits_backward(dQ, qg, Pa))
            groups(dk, gi).copy_(PositiveRandomFeatures.augmented_logits_backward(dK.mul_(K), kg, Pa))
            groups(dv1, gi).add_(dV.mul_(u))
        dv = dv1[..., :-1]
        if mask is not None:
            dv = dv.masked_fill(mask.unsqueeze(-1), 0.0)
        return dq, dk, dv, None, None, None, None, None


class _CausalLinear(torch.autograd.Function):
    """o_i = Σ_{j≤i, same document} (Q_i·K_j) V_j for given features (maps without a stabiliser); (N, L, ·)."""

    @staticmethod
    @_float32_region
    def forward(ctx, Q, K, V, doc, chunk, group):
        groups = _Groups(Q.shape[1], chunk, group, doc)
        O = V.new_empty(V.shape)
        H = Q.new_zeros(Q.shape[0], Q.shape[2], V.shape[2])
        Hs = []
        for gi in range(groups.n_groups):
            Hs.append(H)
            Og, H = _group_forward(groups(Q, gi), groups(K, gi), groups(V, gi), _plain_decays(groups, gi, Q), H)
            groups(O, gi).copy_(Og)
        ctx.save_for_backward(Q, K, V, doc, *Hs)
        ctx.chunk, ctx.group = chunk, group
        return O

    @staticmethod
    @_float32_region
    def backward(ctx, dO):
        Q, K, V, doc, *Hs = ctx.saved_tensors
        groups = _Groups(Q.shape[1], ctx.chunk, ctx.group, doc)
        dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
        U, dO = torch.zeros_like(Hs[0]), dO.contiguous()
        for gi in reversed(range(groups.n_groups)):
            grads = _group_backward(groups(Q, gi), groups(K, gi), groups(V, gi), _plain_decays(groups, gi, Q), Hs[gi],
                                    groups(dO, gi), U)
            for out, gr in zip((dQ, dK, dV), grads[:3], strict=True):
                groups(out, gi).copy_(gr)
            U = grads[3]
        return dQ, dK, dV, None, None, None


def _plain_decays(groups: _Groups, gi: int, like: torch.Tensor):
    """_decays of group gi for a map without a stabiliser (g = 0): only the causal and document masks."""
    n, T = groups.doc.shape[1:]
    g = like.new_zeros(n, like.shape[0], T)
    return _decays(g, groups.doc[gi], like.new_zeros(like.shape[0]), groups.doc_before(gi))


def _chunk_for(m: int, e: int, group: int) -> int:
    """Causal chunk length by shape: per position the masked intra-chunk products cost ∝ T·(m + e) and forming the
    states entering the n = group/T chunks of a group ∝ group·m·e/T², so T ≈ (2·group·m·e/(m + e))^(1/3), rounded to
    a power of two in [16, 256] (m = 256, e = 65, group 4096: T = 64; measured 3.37 s vs 3.59 s for T = 128 at
    L = 8192, fwd+bwd, 8 heads, one thread)."""
    t = (2 * group * m * e / (m + e)) ** (1 / 3)
    return int(min(256, max(16, 2 ** round(math.log2(t)))))


def _document_ids(cu_seqlens: torch.Tensor | None, L: int, Lp: int, device) -> torch.Tensor:
    """(Lp,) int64 document id of every position: 0 everywhere without ``cu_seqlens``; the padding after L is one
    more document."""
    pos = torch.arange(Lp, device=device)
    if cu_seqlens is None:
        return (pos >= L).long()
    inner = cu_seqlens[1:-1].to(device=device, dtype=torch.long)
    return torch.searchsorted(inner, pos, right=True) + (pos >= L).long()


@_float32_region
def _favor_causal(q, k, v, P, fmap: FeatureMap, key_padding_mask, chunk_size, group_size,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, d), (B, H, L, d), (B, H, L, e) -> (B, H, L, e) in the accumulation dtype.

    cu_seqlens: (n+1,) int offsets 0 = o_0 ≤ … ≤ o_n = L of packed documents (B must be 1): position i attends
    only to keys j ≤ i of its own document, as if each document were run alone. The offsets are not read on the
    host (not validated beyond their shape).
    """
    B, H, L, _ = q.shape
    if cu_seqlens is not None and (B != 1 or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point):
        raise ValueError(f"cu_seqlens needs (1, H, L, d) inputs and 1-d integer offsets, got batch {B} and "
                         f"cu_seqlens {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
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
    doc = _document_ids(cu_seqlens, L, Lp, q.device)
    if isinstance(fmap, PositiveRandomFeatures):  # the fused path
        flat = [t.to(acc).reshape(B * H, Lp, t.shape[3]) for t in (q, k, v)]  # (N, L, ·)
        mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)
        out = _SoftmaxCausal.apply(*flat, P.to(acc), mask, doc, T, group).view(B, H, Lp, v.shape[3])
        return out[:, :, :L]
    qf, kf = fmap.features(q, P), fmap.features(k, P)  # (B, H, L, m)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    v1 = _values_with_ones(v.to(_acc(v)), None if key_padding_mask is None else key_padding_mask[:, None])
    m, e = qf.shape[-1], v1.shape[-1]
    o = _CausalLinear.apply(qf.reshape(B * H, Lp, m), kf.reshape(B * H, Lp, m), v1.reshape(B * H, Lp, e), doc, T,
                            group)
    return _normalise(o.view(B, H, Lp, e)[:, :, :L])
