"""FAVOR+ by its definition: the plain, quadratic computation the fast paths are tested against.

Build φ(Q) and φ(K) with the registered feature map, form the (Lq, Lk) matrix W of kernel values
W_ij = φ(q_i)·φ(k_j), zero the pairs a query may not see (padded keys; future keys when causal) and normalise each
row: out = (W / W1) V (DESIGN §2). For positive random features (kernel "softmax") the stabilisers are part of the
definition, since they set the scale the ε floor is measured against (see ``features.py``):
  * query i: the max of its own logits, so φ(q_i) = exp(ℓ(q_i) − max_f ℓ(q_i)) + ε;
  * keys, for query i: c_i = the largest logit of the keys query i sees, φ(k_j) = exp(ℓ(k_j) − c_i) + ε. That is
    one constant per (batch, head) noncausal and the running max over keys j ≤ i causal;
both treated as constants in the backward pass. Every path (noncausal, causal, decoding) must equal this.

It costs O(B·H·Lq·Lk·m) time and memory and has no autocast handling: call it with float64 inputs on small
shapes, in tests; use favor_attention for anything else.
"""

from __future__ import annotations

import torch

from .features import PositiveRandomFeatures, feature_map


def favor_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    P: torch.Tensor | None,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FAVOR+ attention matrix: (B, H, Lq, d), (B, H, Lk, d) -> (B, H, Lq, Lk), rows summing to 1.

    Arguments as favor_attention. A query that sees no key (all padded) gets a zero row.
    """
    fmap = feature_map(kernel)
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    seen = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)  # which keys each query sees
    if key_padding_mask is not None:
        seen = seen & ~key_padding_mask[:, None, None, :]
    if causal:
        seen = seen & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    if isinstance(fmap, PositiveRandomFeatures):
        w = _positive_random_weights(fmap, q, k, P, seen)
    else:
        w = fmap.features(q, P) @ fmap.features(k, P).transpose(-1, -2)  # (B, H, Lq, Lk)
    w = w.masked_fill(~seen, 0.0)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-30)


def _positive_random_weights(fmap: PositiveRandomFeatures, q, k, P, seen) -> torch.Tensor:
    """W_ij = φ(q_i)·φ(k_j) with φ(k_j) = exp(ℓ(k_j) − c_i) + ε, c_i the largest logit of the keys query i sees."""
    fq = fmap.features(q, P)  # (B, H, Lq, m), per-query stabiliser included
    lk = fmap.logits(k, P)  # (B, H, Lk, m)
    c = lk.detach().amax(-1)[:, :, None, :].masked_fill(~seen, float("-inf")).amax(-1)  # (B, H, Lq)
    x = (lk[:, :, None] - c[..., None, None]).masked_fill(~seen[..., None], float("-inf"))  # (B, H, Lq, Lk, m)
    fk = torch.exp(x) + fmap.eps  # φ(k_j) as query i sees it
    return (fq[:, :, :, None] * fk).sum(-1)


def favor_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    P: torch.Tensor | None,
    kernel: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAVOR+ attention by its definition: favor_weights(q, k, ...) @ v, (B, H, Lq, e) in the accumulation dtype.

    Arguments as favor_attention (q, k: (B, H, Lq/Lk, d); v: (B, H, Lk, e); P: (m, d) or None for "relu").
    """
    w = favor_weights(q, k, P, kernel, causal, key_padding_mask)
    return w @ v.to(w.dtype)
