"""Causal FAVOR+ as a chunked scan: out_i = φ(q_i)·S_i / φ(q_i)·z_i with S_i = Σ_{j≤i} φ(k_j)[v_j, 1]ᵀ.

A naive cumsum materialises L·m·e (performer-pytorch's CPU path: 9.6 GiB at 16k); chunks need O(L·m + m·e).
Positive random features (kernel "softmax") take a fused kernel with the running key stabiliser that builds the
features group by group as row softmaxes (the key features and the masked intra-chunk scores are kept for the
backward pass, the query features are built again there); every other feature map goes through its ``features``
and the same scan with no stabiliser (_linear_causal_forward). Both kernels are torch.library custom ops with their
own backward ops, so torch.compile treats each as one opaque node (see the note above _softmax_op). Packed
documents (``cu_seqlens``): the prefix sums, the state and the running key stabiliser all restart at each
document's first position, so every document gets exactly what it would get alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .features import _NEG, FeatureMap, PositiveRandomFeatures
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
# pass recomputes each group's states from the state that entered it (one (N, m, e) per group is saved), takes the
# forward's masked scores (Q Kᵀ)∘D (L·T per head, a quarter of the key features at T = 64) instead of a second
# Q Kᵀ, and scans the state's gradient backwards the same way: memory O(L·(d + e + m + T) + G·m + (G/T)·m·e)
# per head.


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
    Sc, kvc, ac = S.unbind(0), kv.unbind(0), a[:, :, None, None].unbind(0)  # views, taken once
    for c in range(kv.shape[0]):
        torch.addcmul(kvc[c], Sc[c], ac[c], out=Sc[c + 1])
    return S


def _document_prefix(x: torch.Tensor, doc: torch.Tensor, doc_in: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Σ_{j≤i, same document} x_j over one group in natural layout: x (N, G, e), doc (G,), doc_in (0-d) the
    document before the group, C (N, 1, e) that document's sum so far -> (N, G, e). A segmented cumsum: the
    group's cumsum minus its value where i's document starts (cumsums stay group-local, G positions)."""
    N, G, e = x.shape
    pos = torch.arange(G, device=x.device)
    start = torch.where(doc != torch.cat([doc_in.view(1), doc[:-1]]), pos, 0).cummax(0).values  # (G,)
    cs = torch.cat([x.new_zeros(N, 1, e), x.cumsum(1)], dim=1)  # (N, G+1, e): cs[p] = Σ_{j<p} x_j
    carried = (doc == doc_in).unsqueeze(-1).to(x.dtype)  # positions continuing the document before the group
    return (cs[:, 1:] - cs.index_select(1, start)).addcmul_(carried, C)


def _document_prefix_backward(dp: torch.Tensor, doc: torch.Tensor, doc_in: torch.Tensor, U: torch.Tensor):
    """Gradients of _document_prefix wrt x and C, given dp (N, G, e) and U (N, 1, e), the gradient of the group's
    last prefix (the C of the next group): Σ_{i≥j, same document} dp_i, a reversed segmented cumsum."""
    N, G, e = dp.shape
    pos = torch.arange(G, device=dp.device)
    dp = torch.cat([dp[:, :-1], dp[:, -1:] + U], dim=1)
    end = torch.where(doc[:-1] != doc[1:], pos[:-1] + 1, G)  # (G-1,) one past i's document's last position
    end = torch.cat([end, pos.new_full((1,), G)]).flip(0).cummin(0).values.flip(0)
    rs = torch.cat([dp.flip(1).cumsum(1).flip(1), dp.new_zeros(N, 1, e)], dim=1)  # rs[p] = Σ_{i≥p} dp_i
    dx = rs[:, :-1] - rs.index_select(1, end)
    return dx, dx[:, :1] * (doc[0] == doc_in).to(dx.dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """a @ b for (n, N, r, s) @ (n, N, s, t) as one bmm over n·N matrices (a copy only where a's or b's leading dims
    do not fold); acc (n, N, r, t) contiguous: the product is added into it in place (baddbmm), which is returned;
    out (n, N, r, t) contiguous: the product is written there."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if out is not None:
        torch.bmm(a3, b3, out=out.view(-1, *out.shape[-2:]))
        return out
    if acc is None:
        return torch.bmm(a3, b3).view(*a.shape[:-1], b.shape[-1])
    acc.view(-1, *acc.shape[-2:]).baddbmm_(a3, b3)
    return acc


def _scaled(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x·u as a contiguous (n, N, T, e) tensor for chunk-major views x (n, N, T, e), u (n, N, T, 1): a plain
    product would take x's strides, and every bmm on it would copy it first."""
    return torch.mul(x, u, out=x.new_empty(x.shape))


def _group_forward(Q, K, V, decays, H, A_out=None):
    """One group: Q, K (n, N, T, m), V (n, N, T, e), H (N, m, e) entering -> O (n, N, T, e), H leaving and the
    masked intra-chunk scores A = (Q Kᵀ)∘D (n, N, T, T), which _group_backward can take instead of recomputing
    (written into A_out when given)."""
    D, wq, wk, a = decays
    A = _mm(Q, K.mT, out=A_out).mul_(D)
    O = _mm(A, V)  # intra-chunk
    S = _states(_mm(K.mT, V * wk.unsqueeze(-1)), a, H)
    O.add_(_mm(Q, S[:-1]).mul_(wq.unsqueeze(-1)))  # earlier chunks
    return O, S[-1], A


def _group_backward(Q, K, V, decays, H, dO, U, A=None):
    """Gradients of _group_forward wrt Q, K, V, given dO (n, N, T, e), U (N, m, e), the gradient of the state
    leaving the group, and A, the forward's masked scores (None: recomputed); returns dQ, dK (n, N, T, m),
    dV (n, N, T, e) and the gradient of the entering state."""
    D, wq, wk, a = decays
    dO = dO.contiguous()
    Vk = V * wk.unsqueeze(-1)
    S = _states(_mm(K.mT, Vk), a, H)  # the forward states, recomputed
    if A is None:
        A = _mm(Q, K.mT).mul_(D)
    dV = _mm(A.mT, dO)
    dS = _mm(dO, V.mT).mul_(D)
    dQ, dK = _mm(dS, K), _mm(dS.mT, Q)
    del A, dS
    dOq = dO * wq.unsqueeze(-1)
    _mm(dOq, S[:-1].mT, acc=dQ)
    # R[c] = d/dS[c] = a_c R[c+1] + Q_cᵀ dOq_c, backwards from R[n] = U
    qdo = _mm(Q.mT, dOq)  # (n, N, m, e)
    R = torch.empty_like(S)
    R[-1] = U
    Rc, qdoc, ac = R.unbind(0), qdo.unbind(0), a[:, :, None, None].unbind(0)
    for c in reversed(range(qdo.shape[0])):
        torch.addcmul(qdoc[c], Rc[c + 1], ac[c], out=Rc[c])
    _mm(Vk, R[1:].mT, acc=dK)
    dV.add_(_mm(K, R[1:]).mul_(wk.unsqueeze(-1)))
    return dQ, dK, dV, R[0]


class _Groups:
    """The groups of a (N, L, ·) sequence, chunk T, group G, and what enters each: documents doc (L,) and the
    decay weights of a group (_decays) for a given running max, or for none (the ε floors, maps without one)."""

    def __init__(self, L: int, T: int, G: int, doc: torch.Tensor):
        self.T, self.G, self.n_groups = T, G, L // G
        self.doc = doc.view(self.n_groups, G // T, T)  # (ng, n, T)

    def __call__(self, x: torch.Tensor, gi: int) -> torch.Tensor:
        """Group gi of x (N, L, ·) as a (n, N, T, ·) view."""
        return _chunked(x, self.T, self.G, gi)

    def natural(self, x: torch.Tensor, gi: int) -> torch.Tensor:
        """Group gi of x (N, L, ·) in natural layout (N, G, ·): a view."""
        return x[:, gi * self.G : (gi + 1) * self.G]

    def values(self, v: torch.Tensor, mask: torch.Tensor | None, gi: int) -> torch.Tensor:
        """[v, 1] of group gi in natural layout (N, G, e+1), padded rows (mask (N, L), True = padding) zero."""
        return _values_with_ones(self.natural(v, gi), None if mask is None else self.natural(mask, gi))

    @staticmethod
    def chunk_major(x: torch.Tensor, n: int) -> torch.Tensor:
        """(N, G, ·) -> its chunk-major view (n, N, G/n, ·)."""
        return x.view(x.shape[0], n, -1, *x.shape[2:]).transpose(0, 1)

    def doc_before(self, gi: int) -> torch.Tensor:
        """The document of the position before group gi (−1 before the first)."""
        return self.doc[gi - 1, -1, -1] if gi > 0 else self.doc.new_tensor(-1)

    def decays(self, gi: int, g: torch.Tensor, g_in: torch.Tensor):
        """_decays of group gi for its running max g (n, N, T) and the g before it, g_in (N,)."""
        return _decays(g, self.doc[gi], g_in, self.doc_before(gi))

    def plain(self, gi: int, N: int, like: torch.Tensor):
        """_decays of group gi without a stabiliser (g = 0): only the causal and document masks."""
        n, T = self.doc.shape[1:]
        return self.decays(gi, like.new_zeros(n, N, T), like.new_zeros(N))


def _query_features(q: torch.Tensor, Pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive random features of queries as a row softmax: q (n, N, T, d) -> p = softmax_f(ω·q') (n, N, T, m)
    and its row max: φ(q) = p / max p + ε (features.py), and the row scale max p cancels in the ratio."""
    p = torch.softmax(q @ Pa[:, :-1].T, -1)
    return p, p.amax(-1, keepdim=True)


def _key_features(k: torch.Tensor, Pa: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor | None = None):
    """Positive random features of keys: k (n, N, T, d), mask (n, N, T) or None -> p = softmax_f(ω·k')
    (n, N, T, m), the key's log Σ_f exp(ℓ_f) and its largest logit max_f ℓ_f (n, N, T), ℓ = ω·k' − ‖k'‖²/2, so
    φ(k) − ε = p·exp(lse − c) for any stabiliser c. A padded key has lse = −inf and largest logit −1e30. out: where
    p is written (n, N, T, m), or None."""
    y = k @ Pa[:, :-1].T
    top, idx = y.max(-1, keepdim=True)
    p = torch.softmax(y, -1) if out is None else torch.ops.aten._softmax.out(y, -1, False, out=out)
    top = top.add_((k * k).sum(-1, keepdim=True) * Pa[0, -1]).squeeze(-1)
    lse = top - p.gather(-1, idx).squeeze(-1).log()
    if mask is not None:
        top, lse = top.masked_fill(mask, _NEG), lse.masked_fill(mask, float("-inf"))
    return p, lse, top


def _softmax_causal_forward(q: Tensor, k: Tensor, v: Tensor, P: Tensor, mask: Tensor | None, doc: Tensor, chunk: int,
                            group: int, eps: float) -> tuple[Tensor, ...]:
    """FAVOR+ causal softmax attention on flattened (N, L, ·) inputs, L % group == 0, group % chunk == 0.

    Per key, φ(k_j) − ε relative to the stabiliser c_i = g_i equals p_j·exp(lse_j − g_j)·exp(g_j − g_i): the
    scalar u_j = exp(lse_j − g_j) ≤ m goes into the values and exp(g_j − g_i) is the core's decay. ε floors: φ(q)'s
    is in Q; φ(k)'s adds ε·(Σ_f Q_if)·Σ_{j≤i} [v_j, 1], a per-document prefix sum (_document_prefix).
    Everything is done group by group: features, core, ε floor and normaliser here; recomputed query features,
    normaliser gradient, core gradients and logit gradients in _softmax_causal_backward.

    Returns out (N, L, e) and what the backward pass needs: the running max g (N, L), the states entering each
    group Hs (ng, N, m, e+1) and prefix sums Cs (ng, N, 1, e+1), the clamped normaliser den (N, L, 1), and per
    group in chunk-major layout the key features Ks (ng, n, N, T, m), their scales Us (ng, n, N, T) and the masked
    intra-chunk scores As (ng, n, N, T, T). [v, 1] is built group by group, here and in the backward pass.
    """
    N, L, e = v.shape
    Pa = PositiveRandomFeatures.augmented_projection(P, q.dtype)
    groups = _Groups(L, chunk, group, doc)
    ng, n, T, m = groups.n_groups, group // chunk, chunk, P.shape[0]
    out, den, g = v.new_empty(v.shape), v.new_empty(N, L, 1), q.new_empty(N, L)
    Hs = q.new_empty(ng, N, m, e + 1)  # the state entering each group
    Cs = q.new_empty(ng, N, 1, e + 1)  # the prefix sum of [v, 1] entering each group
    Ks, Us, As = q.new_empty(ng, n, N, T, m), q.new_empty(ng, n, N, T), q.new_empty(ng, n, N, T, T)
    H, C, g_in = q.new_zeros(Hs.shape[1:]), q.new_zeros(Cs.shape[1:]), q.new_full((N,), _NEG)
    for gi in range(ng):
        mg = None if mask is None else groups(mask, gi)
        Q, qmax = _query_features(groups(q, gi), Pa)
        Q.add_(eps * qmax)  # φ(q)·max p_q; its row sum is 1 + m ε max p_q (p_q is a softmax)
        K, lse, top = _key_features(groups(k, gi), Pa, mg, out=Ks[gi])
        gg = _running_max(top.transpose(0, 1).reshape(N, -1), doc[gi * group : (gi + 1) * group], g_in,
                          groups.doc_before(gi))
        gc = groups(g, gi)
        gc.copy_(gg.view(N, n, T).transpose(0, 1))
        v1, u = groups.values(v, mask, gi), torch.exp(lse - gc, out=Us[gi]).unsqueeze(-1)
        Hs[gi], Cs[gi] = H, C
        O, H, _ = _group_forward(Q, K, _scaled(groups.chunk_major(v1, n), u), groups.decays(gi, gc, g_in), H,
                                 A_out=As[gi])
        prefix = _document_prefix(v1, groups.doc[gi].flatten(), groups.doc_before(gi), C)
        C = prefix[:, -1:]  # Σ_{j≤i} v1_j in the document, (N, G, e+1)
        O.addcmul_(qmax.mul(m * eps).add_(1.0), groups.chunk_major(prefix, n), value=eps)  # ε floor of φ(k)
        dg = O[..., -1:].clamp_min(_NO_KEY)
        groups(den, gi).copy_(dg)
        torch.div(O[..., :-1], dg, out=groups(out, gi))
        g_in = gg[:, -1]
    return out, g, Hs, Cs, den, Ks, Us, As


def _softmax_causal_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, P: Tensor, mask: Tensor | None,
                             doc: Tensor, out: Tensor, g: Tensor, Hs: Tensor, Cs: Tensor, den: Tensor, Ks: Tensor,
                             Us: Tensor, As: Tensor, chunk: int, group: int,
                             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients dq, dk (N, L, d) and dv (N, L, e) of _softmax_causal_forward's out, given grad (N, L, e) and what
    the forward pass returned."""
    N, L, _ = q.shape
    Pa = PositiveRandomFeatures.augmented_projection(P, q.dtype)
    groups = _Groups(L, chunk, group, doc)
    n, m = group // chunk, P.shape[0]
    grad = grad.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    U, Uc = torch.zeros_like(Hs[0]), torch.zeros_like(Cs[0])
    for gi in reversed(range(groups.n_groups)):
        qg, kg, gc, v1 = groups(q, gi), groups(k, gi), groups(g, gi), groups.values(v, mask, gi)
        dO = _normaliser_backward(groups(grad, gi), groups(out, gi), groups(den, gi))  # (n, N, T, e+1)
        p, qmax = _query_features(qg, Pa)  # recomputed
        Q, K, u, A = p + eps * qmax, Ks[gi], Us[gi].unsqueeze(-1), As[gi]
        g_in = gc.new_full((N,), _NEG) if gi == 0 else groups(g, gi - 1)[-1, :, -1]
        dQ, dK, dV, U = _group_backward(Q, K, _scaled(groups.chunk_major(v1, n), u), groups.decays(gi, gc, g_in),
                                        Hs[gi], dO, U, A)
        # the ε floor of φ(k): o += ε (Σ_f Q_f) prefix, prefix = the document's prefix sum of v1 (recomputed)
        docg, doc_in = groups.doc[gi].flatten(), groups.doc_before(gi)
        prefix = groups.chunk_major(_document_prefix(v1, docg, doc_in, Cs[gi]), n)
        dQ.add_(eps * (dO * prefix).sum(-1, keepdim=True))
        dp = (dO * qmax.mul(m * eps).add_(1.0)).transpose(0, 1).reshape(N, -1, dO.shape[-1])  # Σ_f Q_f as forward
        dVe, Uc = _document_prefix_backward(dp, docg, doc_in, Uc)
        # d/d logits: φ(q) − ε = p_q up to the row scale, φ(k) − ε = p_k·u (u is in the core's V: dK carries it)
        PositiveRandomFeatures.augmented_logits_backward(dQ.mul_(p), qg, Pa, out=groups(dq, gi))
        PositiveRandomFeatures.augmented_logits_backward(dK.mul_(K), kg, Pa, out=groups(dk, gi))
        torch.mul(dV[..., :-1], u, out=groups(dv, gi))
        groups.natural(dv, gi).add_(dVe[..., :-1], alpha=eps)
    if mask is not None:
        dv.masked_fill_(mask.unsqueeze(-1), 0.0)
    return dq, dk, dv


def _linear_causal_forward(Q: Tensor, K: Tensor, V: Tensor, doc: Tensor, chunk: int,
                           group: int) -> tuple[Tensor, Tensor]:
    """o_i = Σ_{j≤i, same document} (Q_i·K_j) V_j for given features (maps without a stabiliser); (N, L, ·).
    Returns O (N, L, e) and the states entering each group Hs (ng, N, m, e)."""
    N = Q.shape[0]
    groups = _Groups(Q.shape[1], chunk, group, doc)
    O = V.new_empty(V.shape)
    Hs = Q.new_empty(groups.n_groups, N, Q.shape[2], V.shape[2])
    H = Q.new_zeros(Hs.shape[1:])
    for gi in range(groups.n_groups):
        Hs[gi] = H
        Og, H, _ = _group_forward(groups(Q, gi), groups(K, gi), groups(V, gi), groups.plain(gi, N, Q), H)
        groups(O, gi).copy_(Og)
    return O, Hs


def _linear_causal_backward(dO: Tensor, Q: Tensor, K: Tensor, V: Tensor, doc: Tensor, Hs: Tensor, chunk: int,
                            group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients dQ, dK (N, L, m) and dV (N, L, e) of _linear_causal_forward's O, given dO (N, L, e)."""
    N = Q.shape[0]
    groups = _Groups(Q.shape[1], chunk, group, doc)
    dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
    U, dO = torch.zeros_like(Hs[0]), dO.contiguous()
    for gi in reversed(range(groups.n_groups)):
        grads = _group_backward(groups(Q, gi), groups(K, gi), groups(V, gi), groups.plain(gi, N, Q), Hs[gi],
                                groups(dO, gi), U)
        for out, gr in zip((dQ, dK, dV), grads[:3], strict=True):
            groups(out, gi).copy_(gr)
        U = grads[3]
    return dQ, dK, dV


# The two kernels are torch.library custom ops: torch.compile (dynamo, AOTAutograd, inductor) sees each as one opaque
# node with the shapes of its fake implementation, whatever the length. Traced through, the group loops unrolled
# with symbolic lengths (dynamic shapes, e.g. after a second batch shape), and the backward's trace took > 10 min.
# The kernels run in float32 (precision.py), so the schemas are given, not read from the wrapped annotations.
_OP = "proteinperformer::"


_T8 = ", ".join(["Tensor"] * 8)
_softmax_op = torch.library.custom_op(
    _OP + "favor_causal_softmax", _float32_region(_softmax_causal_forward), mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor P, Tensor? mask, Tensor doc, int chunk, int group, "
           f"float eps) -> ({_T8})")
_softmax_backward_op = torch.library.custom_op(
    _OP + "favor_causal_softmax_backward", _float32_region(_softmax_causal_backward), mutates_args=(),
    schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor P, Tensor? mask, Tensor doc, Tensor out, Tensor g, "
           "Tensor Hs, Tensor Cs, Tensor den, Tensor Ks, Tensor Us, Tensor As, int chunk, int group, float eps) "
           "-> (Tensor, Tensor, Tensor)")
_linear_op = torch.library.custom_op(
    _OP + "favor_causal_linear", _float32_region(_linear_causal_forward), mutates_args=(),
    schema="(Tensor Q, Tensor K, Tensor V, Tensor doc, int chunk, int group) -> (Tensor, Tensor)")
_linear_backward_op = torch.library.custom_op(
    _OP + "favor_causal_linear_backward", _float32_region(_linear_causal_backward), mutates_args=(),
    schema="(Tensor dO, Tensor Q, Tensor K, Tensor V, Tensor doc, Tensor Hs, int chunk, int group) "
           "-> (Tensor, Tensor, Tensor)")


@_softmax_op.register_fake
def _(q, k, v, P, mask, doc, chunk, group, eps):
    N, L, _ = q.shape
    ng, n, m, e1 = L // group, group // chunk, P.shape[0], v.shape[-1] + 1
    return (v.new_empty(v.shape), q.new_empty(N, L), q.new_empty(ng, N, m, e1),
            q.new_empty(ng, N, 1, e1), v.new_empty(N, L, 1), q.new_empty(ng, n, N, chunk, m),
            q.new_empty(ng, n, N, chunk), q.new_empty(ng, n, N, chunk, chunk))


@_softmax_backward_op.register_fake
def _(grad, q, k, v, P, mask, doc, out, g, Hs, Cs, den, Ks, Us, As, chunk, group, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_linear_op.register_fake
def _(Q, K, V, doc, chunk, group):
    return V.new_empty(V.shape), Q.new_empty(Q.shape[1] // group, Q.shape[0], Q.shape[2], V.shape[2])


@_linear_backward_op.register_fake
def _(dO, Q, K, V, doc, Hs, chunk, group):
    return torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)


def _softmax_setup(ctx, inputs, output):
    q, k, v, P, mask, doc, chunk, group, eps = inputs
    ctx.save_for_backward(q, k, v, P, mask, doc, *output)
    ctx.chunk, ctx.group, ctx.eps = chunk, group, eps
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs (0.27 GiB at L = 16k)


def _softmax_grad(ctx, grad, *_):
    if grad is None:
        return (None,) * 9
    q, k, v, P, mask, doc, out, *saved = ctx.saved_tensors
    dq, dk, dv = _softmax_backward_op(grad, q, k, v, P, mask, doc, out, *saved, ctx.chunk, ctx.group, ctx.eps)
    return dq, dk, dv, None, None, None, None, None, None


def _linear_setup(ctx, inputs, output):
    Q, K, V, doc, chunk, group = inputs
    ctx.save_for_backward(Q, K, V, doc, output[1])
    ctx.chunk, ctx.group = chunk, group
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _linear_grad(ctx, dO, _):
    if dO is None:
        return (None,) * 6
    Q, K, V, doc, Hs = ctx.saved_tensors
    return *_linear_backward_op(dO, Q, K, V, doc, Hs, ctx.chunk, ctx.group), None, None, None


_softmax_op.register_autograd(_softmax_grad, setup_context=_softmax_setup)
_linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


CHUNK = 64  # positions per chunk: intra-chunk cost ∝ T·(m + e) per position, GEMM efficiency rises with T
CPU_GROUP_ELEMENTS = 1 << 20  # a CPU group's features, N·G·m floats (4 MiB), stay in cache between their uses


def _sizes(L: int, chunk_size: int | None, group_size: int, N: int, m: int, device: torch.device) -> tuple[int, int]:
    """(chunk T, group G) for length L: T = chunk_size or CHUNK; G = group_size, on a CPU at most
    CPU_GROUP_ELEMENTS / (N·m) (small groups are faster and smaller there; measured at L = 4096, N = 8 heads,
    m = 256, one thread, CPU time on a shared machine: G = 256 0.91 s, 512 0.67 s, 1024 0.81 s); whole chunks in
    equal groups."""
    T = max(1, min(chunk_size or CHUNK, L))
    if device.type == "cpu":
        group_size = min(group_size, CPU_GROUP_ELEMENTS // max(N * m, 1))
    n_chunks = -(-L // T)
    n_groups = -(-n_chunks // max(1, group_size // T))
    return T, T * -(-n_chunks // n_groups)  # pads fewer than n_groups·T rows


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
    T, group = _sizes(L, chunk_size, group_size, B * H, fmap.num_features(P, q.shape[-1]), q.device)
    pad = -L % group
    if pad:  # right-pad to a whole number of chunks; padded keys come last so they reach no real query
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        mask = key_padding_mask if key_padding_mask is not None else q.new_zeros(B, L, dtype=torch.bool)
        key_padding_mask = torch.nn.functional.pad(mask, (0, pad), value=True)
    Lp, acc = L + pad, _acc(q)
    doc = _document_ids(cu_seqlens, L, Lp, q.device)
    if isinstance(fmap, PositiveRandomFeatures):  # the fused path
        flat = [t.to(acc).reshape(B * H, Lp, t.shape[3]) for t in (q, k, v)]  # (N, L, ·)
        mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)
        out = _softmax_op(*flat, P.to(acc), mask, doc, T, group, fmap.eps)[0].view(B, H, Lp, v.shape[3])
        return out[:, :, :L]
    qf, kf = fmap.features(q, P), fmap.features(k, P)  # (B, H, L, m)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    v1 = _values_with_ones(v.to(_acc(v)), None if key_padding_mask is None else key_padding_mask[:, None])
    m, e = qf.shape[-1], v1.shape[-1]
    o = _linear_op(qf.reshape(B * H, Lp, m), kf.reshape(B * H, Lp, m), v1.reshape(B * H, Lp, e), doc, T, group)[0]
    return _normalise(o.view(B, H, Lp, e)[:, :, :L])
