"""Multi-head self-attention layer of the Performer (Choromanski et al. 2020, 2021).

One module for both the Performer (attention="favor", FAVOR+ softmax or ReLU kernel) and the exact
Transformer baseline (attention="exact"), so models differ only in a config string. The projection ω is a
persistent buffer (checkpoints carry the draw they were trained with) and is resampled by
`proteinperformer.training.callbacks.FeatureRedrawCallback`. Cf. performer-pytorch's SelfAttention and the reference
google-research/performer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .decoding import FavorState, favor_step
from .exact import exact_attention
from .favor import favor_attention
from .features import PositiveRandomFeatures, feature_map
from .oprf import (
    check_features,
    dense_inputs,
    dense_parameters,
    feature_parameters,
    moment_rows,
    oprf_inputs,
    pair_moment_sums,
)
from .projection import gaussian_projection
from .rotary import apply_rotary, rotary_tables
from .window import WindowState, check_window, window_attention, window_step


@dataclass
class KVCache:
    """Decoding state of exact attention: all keys and values so far, (B, H, t, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor


class MultiheadSelfAttention(nn.Module):
    """Self-attention with FAVOR+ or exact softmax attention.

    Args:
        dim: model width D (divisible by heads).
        heads: number of heads H; head_dim = D // H.
        attention: "favor" or "exact".
        kernel: a registered feature map, "softmax" or "relu" (favor only).
        num_features: m random features per head (shared by all heads of the layer).
        orthogonal: orthogonal (else iid) random features.
        use_projection: relu kernel only; False -> φ(x) = relu(x) + 1e-3 with no projection (reference default).
        causal: autoregressive masking.
        dropout: dropout on the attention output (FAVOR+ has no explicit attention matrix to drop from).
        rotary: rotary position embeddings on q and k (ESM-2, RoFormer), applied before any FAVOR+ feature map.
        transferred: favor only; the layer carries trained feature parameters (``proteinperformer.model.transfer``):
            a map whose projection is ``learned`` (hedgehog) has it as a parameter, and any other map gets a
            per-head rescaling Ψ and projection W applied before it, q -> W(Ψq), k -> W(Ψ⁻¹k), so φ sees
            P·W per head (``feature_scale`` = log Ψ (H, d), ``feature_weight`` = W (H, d, d); identity at first).
        window: favor, causal, exp-type maps (softmax kernel, any ``features``) only: W > 0 gives each query
            exact softmax weights on its last W keys and feature weights on the older ones, one normaliser
            (LoLCATs' sliding-window hybrid, ``window.py``); 0 = plain FAVOR.
        features: softmax kernel only: "favor+" (positive random features), "oprf", "oprf-rescaled" or "oprf-dense"
            (FAVOR++, see ``oprf.py``). Other than "favor+" the layer holds the buffers ``feature_moments``
            (H, 3, d); "oprf-dense": (H, 2d + 3, d)) and ``feature_pairs`` (the calibration statistics),
            ``feature_a`` (H,) and ``feature_psi`` (H, d) (A and Ψ derived from them by :meth:`set_feature_moments`),
            and for "oprf-dense" ``feature_dense`` (H, 2, d + 1, d) (M, M⁻ᵀ and the key shift c,
            ``oprf.dense_parameters``; Ψ stays 1); all zero moments (uncalibrated) mean A = 0, Ψ = 1, M = I, c = 0.
            In training, each forward pass adds its batch's moments to a pending sum that
            :meth:`fold_feature_statistics` (called at every feature redraw) folds into the running statistics:
            a batch's statistics only reach later batches, never its own sequences.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attention: str = "favor",
        kernel: str = "softmax",
        num_features: int = 256,
        orthogonal: bool = True,
        use_projection: bool = True,
        causal: bool = False,
        dropout: float = 0.0,
        rotary: bool = False,
        features: str = "favor+",
        transferred: bool = False,
        window: int = 0,
    ):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if attention not in ("favor", "exact"):
            raise ValueError(f"attention must be 'favor' or 'exact', got {attention!r}")
        fmap = feature_map(kernel)  # ValueError naming the registered kernels
        needs_projection = fmap.needs_projection
        if needs_projection and not use_projection:
            raise ValueError(f"the {kernel} kernel needs a projection (use_projection=True)")
        self.heads, self.head_dim = heads, dim // heads
        self.attention, self.kernel, self.causal = attention, kernel, causal
        self.num_features, self.orthogonal = num_features, orthogonal
        self.rotary = rotary
        check_features(features)
        positive = isinstance(feature_map(kernel), PositiveRandomFeatures)
        if features != "favor+" and attention == "favor" and not positive:
            raise ValueError(f"features={features!r} are positive random features of the softmax kernel; the {kernel} "
                             "kernel cannot use them (use features='favor+' or kernel='softmax')")
        self.features = features
        check_window(window)
        if window and attention == "favor":
            if not causal:
                raise ValueError(f"attention window {window} is for causal models only (noncausal models such as "
                                 "ESM-2: leave the window at 0)")
            if not isinstance(feature_map(self.favor_kernel), PositiveRandomFeatures):
                raise ValueError(f"attention window {window} needs an exp-type feature map (kernel 'softmax'), not "
                                 f"the {kernel} kernel; use kernel='softmax' or window 0")
        self.window = window if attention == "favor" else 0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.transferred = transferred and attention == "favor"
        if attention == "favor" and (needs_projection or use_projection):
            P = fmap.init_projection(num_features, self.head_dim, heads, orthogonal)
            if fmap.learned:
                self.projection = nn.Parameter(P)
            else:
                self.register_buffer("projection", P)
        else:
            self.projection = None
        self.feature_scale = self.feature_weight = None  # log Ψ (H, d), W (H, d, d): see ``transferred``
        if self.transferred and not fmap.learned:
            self.feature_scale = nn.Parameter(torch.zeros(heads, self.head_dim))
            self.feature_weight = nn.Parameter(torch.eye(self.head_dim).repeat(heads, 1, 1))
        if features != "favor+":
            hd, rows = self.head_dim, moment_rows(features, self.head_dim)
            self.register_buffer("feature_moments", torch.zeros(heads, rows, hd))
            self.register_buffer("feature_pairs", torch.zeros(()))
            self.register_buffer("feature_a", torch.zeros(heads))
            self.register_buffer("feature_psi", torch.ones(heads, hd))
            if features == "oprf-dense":
                maps = torch.zeros(heads, 2, hd + 1, hd)
                maps[:, :, :hd] = torch.eye(hd)
                self.register_buffer("feature_dense", maps)
            self.register_buffer("pending_moments", torch.zeros(heads, rows, hd),
                                 persistent=False)  # training: sums since the last fold (not in checkpoints)
            self.register_buffer("pending_pairs", torch.zeros(()), persistent=False)

    @property
    def favor_kernel(self) -> str:
        """The registered feature map the FAVOR kernel runs: the layer's ``kernel``, or for FAVOR++ features the
        softmax kernel without its ε floor ("softmax-floorless", see ``features.FloorlessRandomFeatures``)."""
        return "softmax-floorless" if self.features != "favor+" else self.kernel

    @torch.no_grad()
    def set_feature_moments(self, moments: torch.Tensor, pairs: float | torch.Tensor) -> None:
        """Store calibration statistics (pair means (H, 3, d), see ``oprf.pair_moment_sums``, over ``pairs`` pairs)
        and set A and Ψ of this layer's ``features`` from them."""
        if self.features == "favor+":
            raise ValueError("a layer with features='favor+' holds no feature statistics")
        self.feature_moments.copy_(moments)
        self.feature_pairs.fill_(float(pairs))
        if self.features == "oprf-dense":
            a, maps = dense_parameters(moments.cpu().double())
            self.feature_dense.copy_(maps)
        else:
            a, psi = feature_parameters(moments.cpu().double(), self.features)
            self.feature_psi.copy_(psi)
        self.feature_a.copy_(a)

    @torch.no_grad()
    def fold_feature_statistics(self, momentum: float = 0.5) -> bool:
        """Fold the pending training moments into the running statistics (the first fold replaces zero statistics;
        later ones keep ``momentum`` of the old), set A and Ψ, clear the pending sums; False if nothing pending."""
        if self.features == "favor+" or float(self.pending_pairs) == 0:
            return False
        new = self.pending_moments / self.pending_pairs
        old = self.feature_moments.to(new.dtype)
        keep = momentum if float(self.feature_pairs) > 0 else 0.0
        self.set_feature_moments((keep * old + (1 - keep) * new).to(self.feature_moments.dtype),
                                 self.feature_pairs + self.pending_pairs)
        self.pending_moments.zero_()
        self.pending_pairs.zero_()
        return True

    def feature_inputs(
        self, q: torch.Tensor, k: torch.Tensor, heads: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k (B, h, L, d) of the layer's ``heads`` (default all) and the projection as the FAVOR kernel takes
        them: first a transferred layer's trained W(Ψq), W(Ψ⁻¹k); then unchanged for "favor+", else rewritten by
        ``oprf.oprf_inputs`` with this layer's A and Ψ (q̃, k̃ (B, h, L, d + 2), P̃ (m, d + 2)), for "oprf-dense"
        after ``oprf.dense_inputs`` (Mq, M⁻ᵀk − c); a learned map's per-head projection is cut to ``heads``."""
        idx = slice(None) if heads is None else list(heads)
        q, k = self._mapped(q, k, idx)
        P = self.projection
        if self.features != "favor+":
            return oprf_inputs(q, k, P, self.feature_a[idx], self.feature_psi[idx])
        return q, k, (P[idx] if P is not None and P.dim() == 3 else P)  # a learned map: one projection per head

    def _mapped(self, q: torch.Tensor, k: torch.Tensor, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k after a transferred layer's W(Ψ·) and oprf-dense's M, M⁻ᵀ· − c (before ``oprf_inputs``)."""
        if self.feature_weight is not None:
            scale, W = self.feature_scale[idx].exp().unsqueeze(1), self.feature_weight[idx].transpose(-1, -2)
            q, k = (q * scale.to(q.dtype)) @ W.to(q.dtype), (k / scale.to(k.dtype)) @ W.to(k.dtype)
        if self.features == "oprf-dense":
            q, k = dense_inputs(q, k, self.feature_dense[idx])
        return q, k

    def window_logits(
        self, q: torch.Tensor, k: torch.Tensor, heads: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``window.window_attention`` takes for this layer's map: feature logits ℓ of q and k (B, h, L, m) and
        the log-scale δ (B, h, L) with (1/m) Σ_f exp(ℓ_f(q) + ℓ_f(k) + δ(q)) an estimate of exp(qᵀk/√d) (exactly
        so for an untransferred layer): FAVOR++'s per-head constant (1 − 4A)^(d/2) e^(A²) (see ``oprf.py``) and
        oprf-dense's per-query key shift d^(-1/4) (Mq)ᵀc, both of which plain FAVOR's ratio cancels."""
        idx = slice(None) if heads is None else list(heads)
        qm, km = self._mapped(q, k, idx)
        P = self.projection
        shift = q.new_zeros(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        if self.features != "favor+":
            d, a = self.head_dim, self.feature_a[idx].to(shift)
            shift = shift + (0.5 * d * torch.log1p(-4 * a) + a * a)[:, None]
            if self.features == "oprf-dense":
                c = self.feature_dense[idx][:, 1, d].to(shift)  # (h, d)
                shift = shift + (qm.to(shift) * c[:, None]).sum(-1) * d**-0.25
            qm, km, P = oprf_inputs(qm, km, P, self.feature_a[idx], self.feature_psi[idx])
        return PositiveRandomFeatures.logits(qm, P), PositiveRandomFeatures.logits(km, P), shift

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        """Resample the projection in place (same shape, device and dtype); no-op without a projection."""
        if self.projection is None or self.transferred or feature_map(self.kernel).learned:
            return  # trained features stay
        new = gaussian_projection(self.num_features, self.head_dim, self.orthogonal, generator=generator)
        self.projection.copy_(new)

    def favor(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool | None = None,
              key_padding_mask: torch.Tensor | None = None, heads: list[int] | None = None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """FAVOR attention of this layer on split heads, its feature map included (trained features, FAVOR++):
        (B, h, Lq, d), (B, h, Lk, d), (B, h, Lk, e) -> (B, h, Lq, e). ``heads``: the layer's heads these h are
        (default all); ``causal``: default the layer's; ``cu_seqlens``: packed documents (``favor_attention``).
        A causal layer with a ``window`` runs the sliding-window hybrid (``window.window_attention``)."""
        causal = self.causal if causal is None else causal
        if self.window and causal:
            ql, kl, shift = self.window_logits(q, k, heads)
            return window_attention(q, k, v, ql, kl, shift, self.window, key_padding_mask, cu_seqlens)
        q, k, P = self.feature_inputs(q, k, heads)
        return favor_attention(q, k, v, P, kernel=self.favor_kernel, causal=causal, key_padding_mask=key_padding_mask,
                               cu_seqlens=cu_seqlens)

    def split_heads(
        self, x: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) -> q, k, v each (B, H, L, head_dim); with rotary, q and k are rotated by their positions
        start..start+L-1, or ``positions`` (LongTensor [L]; packed documents) (so every attention path, and the
        maps in ``analysis.maps``, sees rotated q and k)."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, L, hd)
        if self.rotary:
            # one cos/sin pair for q and k: backward keeps it once; (L, hd) per token for packed documents
            tables = rotary_tables(L, self.head_dim, start, x.device, positions)
            q, k = apply_rotary(q, tables=tables), apply_rotary(k, tables=tables)
        return q, k, v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, L, hd = y.shape
        return self.dropout(self.out(y.transpose(1, 2).reshape(B, L, H * hd)))  # (B, L, D)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, L, D); key_padding_mask: (B, L) bool, True = padding. Returns (B, L, D).

        Packed documents (B = 1): ``cu_seqlens`` (n + 1,) int32 offsets (each document attends only to itself)
        and, for rotary, ``positions`` LongTensor [L] (restarting at each document; ``documents.py``)."""
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, length, dim], got {tuple(x.shape)}")
        q, k, v = self.split_heads(x, positions=positions)
        if self.attention == "exact":
            y = exact_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                cu_seqlens=cu_seqlens)
        else:
            if self.training and self.features != "favor+":
                with torch.no_grad():  # FAVOR++ from scratch: folded into A and Ψ at the next redraw
                    sums, pairs = pair_moment_sums(q.detach(), k.detach(), self.causal, key_padding_mask,
                                                   dense=self.features == "oprf-dense")
                    self.pending_moments += sums.to(self.pending_moments.dtype)
                    self.pending_pairs += pairs.to(self.pending_pairs.dtype)
            y = self.favor(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
        return self._merge(y)

    def init_state(self, batch_size: int, device=None, dtype=None) -> FavorState | KVCache | WindowState:
        """Empty decoding state: FavorState (O(m·head_dim) per head) or, for exact attention, a KV cache."""
        if self.attention == "exact":
            empty = torch.zeros(batch_size, self.heads, 0, self.head_dim, device=device, dtype=dtype)
            return KVCache(k=empty, v=empty.clone())
        m = feature_map(self.kernel).num_features(self.projection, self.head_dim)
        if self.window:
            return WindowState.zeros(batch_size, self.heads, m, self.head_dim, self.head_dim, device)
        return FavorState.zeros(batch_size, self.heads, m, self.head_dim, device)

    def step(self, x_t: torch.Tensor, state: FavorState | KVCache | WindowState
             ) -> tuple[torch.Tensor, FavorState | KVCache | WindowState]:
        """One causal decoding step. x_t: (B, 1, D) -> (y_t (B, 1, D), new state); equals forward's row t."""
        if x_t.dim() != 3 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must be [batch, 1, dim], got {tuple(x_t.shape)}")
        q, k, v = self.split_heads(x_t, tokens_seen(state))  # (B, H, 1, hd); this token's position
        if self.attention == "exact":
            state = KVCache(k=torch.cat([state.k, k], dim=2), v=torch.cat([state.v, v], dim=2))
            y = exact_attention(q, state.k, state.v)  # the cache holds only keys ≤ t
        elif self.window:
            ql, kl, shift = self.window_logits(q, k)
            y, state = window_step(q, k, v, ql, kl, shift, self.window, state)
        else:
            q, k, P = self.feature_inputs(q, k)
            y, state = favor_step(q, k, v, P, state, kernel=self.favor_kernel)
        return self._merge(y), state


def tokens_seen(state: FavorState | KVCache | WindowState) -> int:
    """How many tokens a decoding state has consumed (= the position of the next token)."""
    if isinstance(state, KVCache):
        return state.k.shape[2]
    return state.position  # counted on the host: no device read per layer per token
