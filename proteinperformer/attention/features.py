"""FAVOR+ feature maps φ, one class per map, registered by name (the ``kernel`` string users pass).

Attention is approximated by φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1), so a feature map is all that tells one FAVOR+ variant
from another. Each map is one small class; ``@register`` makes favor_attention, favor_step, the attention layer
and the reference (``attention/reference.py``) accept its name, and ``feature_map(name)`` is the only place a
kernel name is looked up. A map without a stabiliser needs only ``features``: the plain linear-attention paths
use it for queries and keys. Positive random features (kernel "softmax") need stabilisers and have fused paths.

Positive random features (Choromanski et al. 2021; DESIGN §2), x' = d^(-1/4) x:
    φ(x) = m^(-1/2) (exp(ωᵢᵀx' − ‖x'‖²/2 − c) + ε),   E[φ(q)·φ(k)] = exp(qᵀk/√d) for ε = 0, c = 0.
The m^(-1/2) factor cancels in the ratio and is dropped. Stabilisers c (they cancel exactly in the ratio; they
only set the scale the ε floor is measured against):
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

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .precision import _acc
from .projection import gaussian_projection

SOFTMAX_EPS = 1e-6  # reference value; performer-pytorch's 1e-4 collapses sharp attention towards the mean
RELU_EPS = 1e-3
_NEG = -1e30  # finite "minus infinity" for stabilisers (keeps exp(a - b) free of inf - inf)


class FeatureMap(ABC):
    """A positive feature map φ with φ(q)·φ(k) the attention kernel (estimated or exact).

    Subclass it, set ``name`` (the kernel string), ``eps`` and ``needs_projection``, define ``features`` and
    decorate the class with ``@register``: nothing else in the package names kernels.
    """

    name: ClassVar[str]
    eps: ClassVar[float]  # the positive floor added to every feature
    needs_projection: ClassVar[bool] = False  # True: P (m, d) is required; False: P may be None
    learned: ClassVar[bool] = False  # True: P is a trained parameter (one per head), never redrawn

    def num_features(self, P: torch.Tensor | None, head_dim: int) -> int:
        """m, the length of φ(x): the projection's rows, or head_dim without a projection."""
        return head_dim if P is None else P.shape[-2]

    def init_projection(self, num_features: int, head_dim: int, heads: int, orthogonal: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """The projection a new layer starts with: a random draw (m, d) shared by the layer's heads."""
        return gaussian_projection(num_features, head_dim, orthogonal, generator=generator)

    @abstractmethod
    def features(self, x: torch.Tensor, P: torch.Tensor | None) -> torch.Tensor:
        """φ(x) without the m^(-1/2) factor, for queries and keys: (..., L, d) -> (..., L, m) in the accumulation
        dtype; x is unscaled (d^(-1/4) is applied here)."""


FEATURE_MAPS: dict[str, FeatureMap] = {}


def register(cls: type[FeatureMap]) -> type[FeatureMap]:
    """Class decorator: make ``kernel=cls.name`` mean this feature map everywhere."""
    if cls.name in FEATURE_MAPS:
        raise ValueError(f"a feature map named {cls.name!r} is already registered")
    FEATURE_MAPS[cls.name] = cls()
    return cls


def feature_map(name: str) -> FeatureMap:
    """The feature map registered as ``name``; ValueError naming the registered ones otherwise."""
    try:
        return FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; registered feature maps: {sorted(FEATURE_MAPS)}") from None


@register
class ReluFeatures(FeatureMap):
    """Generalised ReLU kernel, "Performer-ReLU" (the paper's best protein model): φ(x) = relu(ωᵢᵀx') + 1e-3, or
    relu(x') + 1e-3 without a projection (the reference default). Not random, never large: no stabiliser."""

    name = "relu"
    eps = RELU_EPS

    def features(self, x: torch.Tensor, P: torch.Tensor | None) -> torch.Tensor:
        x = x.to(_acc(x)) * x.shape[-1] ** -0.25
        return torch.relu(x if P is None else x @ P.to(x.dtype).T) + self.eps


@register
class PositiveRandomFeatures(FeatureMap):
    """Positive random features for the softmax kernel (FAVOR+): φ(x) = exp(ωᵢᵀx' − ‖x'‖²/2 − c) + ε.

    ``features`` is φ(q) with its per-query stabiliser; keys need one shared stabiliser (see the module docstring),
    which the fused paths (noncausal.py, causal.py), the decoder (decoding.py) and the reference (reference.py)
    apply to ``logits``. The fused paths build the logits from the augmented projection below instead: there
    x·ωᵢ d^(-1/4) − ‖x‖² d^(-1/2)/2 is one matmul of [x, ‖x‖²] with [P d^(-1/4), −d^(-1/2)/2], the stabiliser and
    exp run in place on its output, and the +ε of φ is applied as a rank-1 correction of the small (m, e)
    products instead of a pass over the (L, m) features.
    """

    name = "softmax"
    eps = SOFTMAX_EPS
    needs_projection = True

    @staticmethod
    def logits(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """ωᵢᵀx' − ‖x'‖²/2 with x' = d^(-1/4)x: (..., L, d) -> (..., L, m) in the accumulation dtype."""
        x = x.to(_acc(x)) * x.shape[-1] ** -0.25
        return x @ P.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True)

    def features(self, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """φ(q) with the per-query stabiliser (a row scale, which cancels in the ratio): (..., L, m)."""
        xq = self.logits(x, P)
        cq = xq.amax(-1, keepdim=True).detach()  # per-query stabiliser
        return torch.exp(xq - cq) + self.eps

    @staticmethod
    def augmented_projection(P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[P d^(-1/4), −d^(-1/2)/2]: (m, d+1)."""
        d = P.shape[1]
        col = torch.full((P.shape[0], 1), -0.5 * d**-0.5, dtype=dtype, device=P.device)
        return torch.cat([P.to(dtype) * d**-0.25, col], dim=1)

    @staticmethod
    def augmented_logits(x: torch.Tensor, Pa: torch.Tensor) -> torch.Tensor:
        """ω·x' − ‖x'‖²/2 for x (N, L, d) -> (N, L, m) via one GEMM with Pa = augmented_projection(P)."""
        xa = torch.cat([x, (x * x).sum(-1, keepdim=True)], dim=-1)  # (N, L, d+1)
        return xa @ Pa.T

    @staticmethod
    def augmented_logits_backward(dlogits: torch.Tensor, x: torch.Tensor, Pa: torch.Tensor,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient of augmented_logits wrt x: (N, L, m) -> (N, L, d), written into ``out`` when given."""
        dxa = dlogits @ Pa  # (N, L, d+1)
        return torch.addcmul(dxa[..., :-1], x, dxa[..., -1:], value=2.0, out=out)


@register
class FloorlessRandomFeatures(PositiveRandomFeatures):
    """Positive random features without the ε floor: φ(x) = exp(ωᵢᵀx' − ‖x'‖²/2 − c), the unbiased estimator itself.

    What FAVOR++ layers (``features`` other than "favor+", ``oprf.py``) run on: their rewritten q, k may make every
    product φ(q)·φ(k) of a query far smaller than the stabilisers (the key shift of "oprf-dense" subtracts a large
    common part of the logits, qᵀc, which the normaliser cancels), and an ε = 1e-6 floor then swamps the signal
    (IgLM-S, m = 256: "oprf-dense" 50.1% next-residue accuracy with the floor, 71.4% without; "oprf" and
    "oprf-rescaled" lose 1-2 points to it). The fused paths are the same; only ε differs. A query whose every key
    product underflows gets a zero output (the normaliser's clamp), as a query that sees no key.
    """

    name = "softmax-floorless"
    eps = 0.0


@register
class HedgehogFeatures(FeatureMap):
    """Hedgehog's learned map (Zhang et al., ICLR 2024): φ(x) = [softmax(W x'), softmax(−W x')] + ε, x' = d^(-1/4) x.

    W (H, m/2, d) is one trained matrix per head (``learned``), fitted so that φ(q)·φ(k) mimics the trained
    softmax attention (``proteinperformer.model.transfer``); it starts as a random FAVOR+ draw. The softmaxes keep
    every feature in [0, 1], so no stabiliser is needed and the plain linear-attention paths serve all uses. It
    estimates no kernel: untrained, it is only a starting point.
    """

    name = "hedgehog"
    eps = RELU_EPS
    needs_projection = True
    learned = True

    def num_features(self, P: torch.Tensor | None, head_dim: int) -> int:
        return 2 * P.shape[-2]

    def init_projection(self, num_features: int, head_dim: int, heads: int, orthogonal: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """(H, m/2, d): an independent random draw per head (m must be even)."""
        if num_features % 2:
            raise ValueError(f"the hedgehog map needs an even number of features, got {num_features}")
        half = num_features // 2
        return gaussian_projection(heads * half, head_dim, orthogonal, generator=generator).view(heads, half, head_dim)

    def features(self, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """(B, H, L, d) with P (H, m/2, d) -> (B, H, L, m); (..., L, d) with a shared P (m/2, d) too."""
        x = x.to(_acc(x)) * x.shape[-1] ** -0.25
        z = x @ P.to(x.dtype).transpose(-1, -2)  # (B, H, L, m/2)
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1) + self.eps


def positive_random_features(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The unstabilised FAVOR+ map φ(x) = m^(-1/2) exp(Px − ‖x‖²/2), so E[φ(q)·φ(k)] = exp(qᵀk).

    No d^(-1/4) scaling, stabiliser or ε (for tests and analysis). x: (..., d), P: (m, d) -> (..., m).
    """
    logits = x @ P.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True)
    return torch.exp(logits) * P.shape[0] ** -0.5
