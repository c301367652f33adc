"""Noncausal FAVOR+: out = φ(Q)(φ(K)ᵀ[V, 1]), split into numerator and normaliser (Choromanski et al. 2021).

O(L·m·e) time and O(L·m + m·e) memory instead of O(L²). Positive random features (kernel "softmax") take a fused
autograd Function that builds the features in cache-sized row blocks and keeps only φ(Q), φ(K) (L·m each) for the
backward pass; every other feature map goes through its ``features`` and two matmuls under autograd.
"""

from __future__ import annotations

import torch

from .documents import per_document
from .features import _NEG, FeatureMap, PositiveRandomFeatures
from .normaliser import _NO_KEY, _normalise, _normaliser_backward, _values_with_ones
from .precision import _acc, _float32_region

ROW_BLOCK_ELEMENTS = 1 << 19  # CPU feature block: N·rows·m floats (see _row_block)


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
    stabilised φ of the definition (reference.py; stabilisers constant in the backward pass).
    """

    @staticmethod
    @_float32_region
    def forward(ctx, q, k, v, P, mask, eps):
        N, Lq, _ = q.shape
        Lk, m = k.shape[1], P.shape[0]
        Pa = PositiveRandomFeatures.augmented_projection(P, q.dtype)  # (m, d+1); column d: −d^(-1/2)/2 for ‖x‖²
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
        kv.add_(eps * v1.sum(1, keepdim=True))  # the ε floor of φ(k) on real keys
        kv_sum = kv.sum(1, keepdim=True)  # (N, 1, e+1): what the ε floor of φ(q) sees
        # queries: o = (p_q + ε max p_q) kv, blocks
        pq, pq_max = [], q.new_empty(N, Lq, 1)
        out, den = q.new_empty(N, Lq, v.shape[-1]), q.new_empty(N, Lq, 1)
        for a in range(0, Lq, rows):
            pb = torch.softmax(q[:, a : a + rows] @ Ps.T, -1)
            pm = pb.amax(-1, keepdim=True)
            o = torch.baddbmm(eps * pm * kv_sum, pb, kv)  # (N, r, e+1)
            d_b = o[..., -1:].clamp_min(_NO_KEY)  # a query that sees no key at all gets 0
            torch.div(o[..., :-1], d_b, out=out[:, a : a + rows])
            den[:, a : a + rows], pq_max[:, a : a + rows] = d_b, pm
            pq.append(pb)
        ctx.save_for_backward(q, k, v1, kv, out, den, pq_max, logw, Pa, mask, *pq, *pk)
        ctx.blocks, ctx.eps = (rows, len(pq)), eps
        return out

    @staticmethod
    @_float32_region
    def backward(ctx, grad):
        q, k, v1, kv, out, den, pq_max, logw, Pa, mask, *blocks = ctx.saved_tensors
        (rows, nq), eps = ctx.blocks, ctx.eps
        pq, pk = blocks[:nq], blocks[nq:]
        do = _normaliser_backward(grad, out, den)  # (N, Lq, e+1)
        dq = torch.empty_like(q)
        dkv = eps * (pq_max * do).sum(1, keepdim=True).expand_as(kv).clone()  # via the ε floor of φ(q)
        for i, pb in enumerate(pq):
            a = i * rows
            dob = do[:, a : a + rows]
            dkv.baddbmm_(pb.transpose(-1, -2), dob)
            dlogits = (dob @ kv.transpose(-1, -2)).mul_(pb)  # stabiliser and row scale are constants
            PositiveRandomFeatures.augmented_logits_backward(dlogits, q[:, a : a + rows], Pa, out=dq[:, a : a + rows])
        dk, dv = torch.empty_like(k), torch.empty_like(v1[..., :-1])
        w = logw.exp()  # (N, Lk, 1), 0 on padded keys
        dv_eps = eps * dkv.sum(1, keepdim=True)  # (N, 1, e+1) via the ε floor of φ(k)
        for i, pb in enumerate(pk):
            a = i * rows
            wv = w[:, a : a + rows] * v1[:, a : a + rows]
            dlogits = (wv @ dkv.transpose(-1, -2)).mul_(pb)
            PositiveRandomFeatures.augmented_logits_backward(dlogits, k[:, a : a + rows], Pa, out=dk[:, a : a + rows])
            dvb = (pb @ dkv).mul_(w[:, a : a + rows]).add_(dv_eps)
            dv[:, a : a + rows] = dvb[..., :-1]
        if mask is not None:
            dv.masked_fill_(mask.unsqueeze(-1), 0.0)
        return dq, dk, dv, None, None, None


class _SoftmaxNoncausalPacked(torch.autograd.Function):
    """:class:`_SoftmaxNoncausal` on packed documents (N, T, ·) with ``sizes`` (n documents' lengths, summing to
    T): each document exactly as alone (its own key stabiliser, key sums and ε floors), in few operations.

    Everything row-wise (feature logits, softmax, stabilisers, normaliser, the feature backward) runs once over
    the whole stream; only the per-document GEMMs (key sums and their use: 2 forward, 4 backward) run per
    document, on views of the stream, writing into whole-stream buffers (no concatenation), with each document's
    ε-floor terms folded into its own GEMMs (a broadcast GEMM input, an ``addcmul``; no stream-long gathers or
    ``index_add``). One call per document of the unpacked Function cost ~0.7 ms of fixed overhead each (its ~40
    small operations and the autograd call), which made packed Performer-softmax steps slower per token than
    length-bucketed ones.
    """

    @staticmethod
    @_float32_region
    def forward(ctx, q, k, v, P, mask, sizes, eps):
        N, T, _ = q.shape
        n = len(sizes)
        doc = torch.repeat_interleave(torch.arange(n, device=q.device), torch.tensor(sizes, device=q.device))
        Pa = PositiveRandomFeatures.augmented_projection(P, q.dtype)
        Ps = Pa[:, :-1].contiguous()
        v1 = _values_with_ones(v, mask)  # (N, T, e+1), padded rows zero
        y = k @ Ps.T  # (N, T, m): ω·k'
        top, idx = y.max(-1, keepdim=True)
        pk = torch.softmax(y, -1)
        del y
        top = top + (k * k).sum(-1, keepdim=True) * Pa[0, -1]  # each key's largest logit
        lw = top - pk.gather(-1, idx).log()  # log Σ_f exp(logit)
        if mask is not None:
            pad = mask.unsqueeze(-1)
            top, lw = top.masked_fill(pad, _NEG), lw.masked_fill(pad, float("-inf"))
        C = top.new_full((N, n), _NEG).scatter_reduce_(1, doc.expand(N, T), top.squeeze(-1), "amax")  # per doc
        logw = lw - C[:, doc].unsqueeze(-1)  # w = exp(logw) ≤ m: φ(k) − ε = p_k·w ≤ 1
        wv = logw.exp() * v1
        pq = torch.softmax(q @ Ps.T, -1)  # (N, T, m)
        pq_max = pq.amax(-1, keepdim=True)
        kv = v1.new_empty(n, N, Ps.shape[0], v1.shape[-1])  # (n, N, m, e+1)
        for kv_i, pk_i, wv_i, v1_i in zip(kv, *_documents(sizes, pk, wv, v1), strict=True):
            # kv_i = p_kᵀ (w v1) + ε Σ v1: the ε floor of φ(k) on the document's real keys
            torch.baddbmm(v1_i.sum(1, keepdim=True), pk_i.transpose(-1, -2), wv_i, beta=eps, out=kv_i)
        kv_sum = kv.sum(2, keepdim=True)  # (n, N, 1, e+1): what the ε floor of φ(q) sees
        o = torch.empty_like(v1)  # (N, T, e+1)
        for kv_i, s_i, pq_i, pm_i, o_i in zip(kv, kv_sum, *_documents(sizes, pq, pq_max, o), strict=True):
            torch.bmm(pq_i, kv_i, out=o_i).addcmul_(pm_i, s_i, value=eps)
        den = o[..., -1:].clamp_min(_NO_KEY)  # a query that sees no key at all gets 0
        out = o[..., :-1] / den
        ctx.save_for_backward(q, k, v1, kv, out, den, pq_max, logw, Pa, mask, pq, pk)
        ctx.sizes, ctx.eps = sizes, eps
        return out

    @staticmethod
    @_float32_region
    def backward(ctx, grad):
        q, k, v1, kv, out, den, pq_max, logw, Pa, mask, pq, pk = ctx.saved_tensors
        sizes, eps = ctx.sizes, ctx.eps
        do = _normaliser_backward(grad, out, den)  # (N, T, e+1)
        dkv = torch.empty_like(kv)
        dlogits = torch.empty_like(pq)  # (N, T, m): the queries' feature-logit gradients, then the keys'
        for dkv_i, kv_i, do_i, pq_i, pm_i, dl_i in zip(dkv, kv, *_documents(sizes, do, pq, pq_max, dlogits),
                                                       strict=True):
            eps_q = torch.bmm(pm_i.transpose(-1, -2), do_i)  # (N, 1, e+1): via the ε floor of φ(q)
            torch.baddbmm(eps_q, pq_i.transpose(-1, -2), do_i, beta=eps, out=dkv_i)
            torch.bmm(do_i, kv_i.transpose(-1, -2), out=dl_i)
        dq = PositiveRandomFeatures.augmented_logits_backward(dlogits.mul_(pq), q, Pa)
        w = logw.exp()  # (N, T, 1), 0 on padded keys
        dv = torch.empty_like(v1)
        for dkv_i, wv_i, pk_i, dl_i, dv_i in zip(dkv, *_documents(sizes, w * v1, pk, dlogits, dv), strict=True):
            torch.bmm(wv_i, dkv_i.transpose(-1, -2), out=dl_i)
            torch.bmm(pk_i, dkv_i, out=dv_i)
        dk = PositiveRandomFeatures.augmented_logits_backward(dlogits.mul_(pk), k, Pa)
        dv.mul_(w)
        for dv_i, s_i in zip(_documents(sizes, dv)[0], dkv.sum(2, keepdim=True), strict=True):
            dv_i.add_(s_i, alpha=eps)  # via the ε floor of φ(k)
        dv = dv[..., :-1]
        if mask is not None:
            dv = dv.masked_fill(mask.unsqueeze(-1), 0.0)
        return dq, dk, dv, None, None, None, None


def _documents(sizes: list[int], *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each (N, T, ·) tensor split into its documents' (N, Lᵢ, ·) views."""
    return [t.split(sizes, 1) for t in tensors]


def _softmax_noncausal_packed(q, k, v, Pa, mask, sizes: list[int], eps: float) -> torch.Tensor:
    """:class:`_SoftmaxNoncausalPacked` on runs of consecutive documents of about one row block each
    (:func:`_row_block`; a longer document alone), so that a run's (rows, m) features stay in cache between their
    passes, as the unpacked Function's blocks do: one call over a whole 16k-token stream lost to the unpacked
    per-protein calls what it saved in overhead. (N, T, ·) -> (N, T, e); a GPU takes the whole stream at once."""
    rows = _row_block(q.shape[0], q.shape[1], Pa.shape[0], q.device)
    runs, run = [], []
    for size in sizes:
        if run and sum(run) + size > rows:
            runs.append(run)
            run = []
        run.append(size)
    runs.append(run)
    if len(runs) == 1:
        return _SoftmaxNoncausalPacked.apply(q, k, v, Pa, mask, sizes, eps)
    lengths = [sum(r) for r in runs]
    pieces = zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1),
                 [None] * len(runs) if mask is None else mask.split(lengths, 1), runs, strict=True)
    return torch.cat([_SoftmaxNoncausalPacked.apply(qr, kr, vr, Pa, mr, r, eps) for qr, kr, vr, mr, r in pieces], 1)


@_float32_region
def _favor_noncausal(q, k, v, P, fmap: FeatureMap, key_padding_mask, cu_seqlens=None) -> torch.Tensor:
    """(B, H, Lq, d), (B, H, Lk, d), (B, H, Lk, e) -> (B, H, Lq, e) in the accumulation dtype.

    ``cu_seqlens`` (n + 1,) (packed documents, B = 1, Lq = Lk; ``documents.py``): per-document key sums, so each
    document's queries see only its own keys, exactly as if it were run alone.
    """
    B, H = q.shape[:2]
    acc = _acc(q)
    if isinstance(fmap, PositiveRandomFeatures):  # the fused path (its key stabiliser is per document too)
        flat = [t.to(acc).reshape(B * H, t.shape[2], t.shape[3]) for t in (q, k, v)]  # (N, L, ·)
        mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(H, 0)
        Pa = P.to(acc)
        if cu_seqlens is None:
            out = _SoftmaxNoncausal.apply(*flat, Pa, mask, fmap.eps)
        else:
            out = _softmax_noncausal_packed(*flat, Pa, mask, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), fmap.eps)
        return out.view(B, H, q.shape[2], v.shape[3])
    qf, kf = fmap.features(q, P), fmap.features(k, P)  # (B, H, L, m)
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    v1 = _values_with_ones(v.to(_acc(v)), None)  # (B, H, Lk, e+1)
    if cu_seqlens is None:
        return _normalise(qf @ (kf.transpose(-1, -2) @ v1))  # kv: (B, H, m, e+1)
    # per-document key sums: kv_i = φ(K_i)ᵀ[V_i, 1], then φ(Q_i) kv_i
    return _normalise(per_document(lambda qd, kd, vd: qd @ (kd.transpose(-1, -2) @ vd), cu_seqlens, qf, kf, v1))
