"""FAVOR++: optimal positive random features (OPRF) and per-dimension rescaling, as inputs to the FAVOR+ kernel.

Likhosherstov, Choromanski et al., "Chefs' Random Tables: Non-Trigonometric Random Features" (NeurIPS 2022), and
the rescaling of their "dense-exponential random features" (SADERF, "FAVOR#", 2023). With x = d^(-1/4) q,
y = d^(-1/4) k and ω ~ N(0, I_d), for any A < 1/4

    f(ω, x) = (1 − 4A)^(d/4) exp(A‖ω‖² + √(1 − 4A) ωᵀx − ‖x‖²/2),    E[f(ω, x) f(ω, y)] = exp(xᵀy),

and A = 0 is FAVOR+'s positive random feature. The variance is smallest at
A* = (1 − 2r − √((2r + 1)² + 8r)) / 16 with r = Φ/d and Φ the mean of ‖x + y‖² over the query–key pairs the
attention sees (A* ≤ 0; trained queries and keys have large norms, where FAVOR+'s variance explodes). Rescaling
x → Ψx, y → Ψ⁻¹y with Ψ_l = (Σ y_l² / Σ x_l²)^(1/4) leaves xᵀy unchanged and minimises Φ over diagonal Ψ.

The names users pass (``features``): ``favor+`` (A = 0, Ψ = 1: today's FAVOR+), ``oprf`` (A* on the raw q, k) and
``oprf-rescaled`` (Ψ, then A* on Ψq, Ψ⁻¹k). A and Ψ are statistics per layer × head, calibrated on sequences
(:func:`proteinperformer.model.calibration.calibrate_features`) from the pair moments below and then frozen.

No kernel knows about any of this: :func:`oprf_inputs` rewrites q, k and the projection P so that the positive
random feature logits ``P̃ x̃'' − ‖x̃''‖²/2`` (x̃'' = d̃^(-1/4) x̃) of the existing paths (noncausal, causal, decoding,
reference, maps) are the OPRF logits up to constants that cancel in the normalised attention. P is shared by the
heads of a layer and A is not, so with s_h = √(1 − 4A_h) and s = max_h s_h:
  * P̃ = [s P, ‖ω_j‖², 0] and x̃'' = [(s_h / s) x, A_h, √(1 − (s_h / s)²) ‖x‖], d̃ = d + 2;
  * the first block gives s_h ωᵀx, the second A_h ‖ω_j‖² (the per-feature offset), and the third, which no row of
    P̃ sees, brings the norm back to ‖x̃''‖² = ‖x‖² + A_h²;
  * left over are constants per head, (1 − 4A)^(d/4) and exp(−A_h²/2): they scale every feature of every token of
    a head alike and cancel in φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1).
Each token's x̃ depends on that token only, so causal attention and decoding see no future token.
"""

from __future__ import annotations

import torch

from proteinperformer.options import FEATURES  # noqa: E402  (the names, torch-free for --help)

MOMENTS = 3  # pair means of x_l², y_l², x_l y_l (x = d^(-1/4) q, y = d^(-1/4) k): (H, 3, d)


def check_features(features: str) -> None:
    """ValueError naming the choices unless ``features`` is one of :data:`FEATURES`."""
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; choose from {', '.join(FEATURES)}")


def optimal_a(phi: torch.Tensor, d: int) -> torch.Tensor:
    """A* = (1 − 2r − √((2r + 1)² + 8r)) / 16 with r = Φ/d; Φ ≥ 0 any shape -> A* ≤ 0 of the same shape."""
    r = phi.clamp_min(0) / d
    return (1 - 2 * r - torch.sqrt((2 * r + 1) ** 2 + 8 * r)) / 16


def rescaling(moments: torch.Tensor) -> torch.Tensor:
    """Ψ_l = (Σ y_l² / Σ x_l²)^(1/4) from pair moments (H, 3, d) -> (H, d); 1 where a moment is zero."""
    xx, yy = moments[:, 0], moments[:, 1]
    ok = (xx > 0) & (yy > 0)
    psi = (yy / xx.where(ok, torch.ones_like(xx))) ** 0.25
    return psi.where(ok, torch.ones_like(psi)).clamp(1e-3, 1e3)


def feature_parameters(moments: torch.Tensor, features: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (H,) and Ψ (H, d) of ``features`` from the pair moments (H, 3, d) (all zero: A = 0, Ψ = 1, FAVOR+).

    Φ(Ψ) = Σ_l Ψ_l² E[x_l²] + Ψ_l⁻² E[y_l²] + 2 E[x_l y_l], the mean of ‖Ψx + Ψ⁻¹y‖² over the pairs.
    """
    check_features(features)
    H, _, d = moments.shape
    psi = rescaling(moments) if features == "oprf-rescaled" else torch.ones(H, d, dtype=moments.dtype)
    phi = (psi**2 * moments[:, 0] + moments[:, 1] / psi**2 + 2 * moments[:, 2]).sum(-1)
    a = optimal_a(phi, d) if features != "favor+" else torch.zeros(H, dtype=moments.dtype)
    return a, psi


def pair_moment_sums(q: torch.Tensor, k: torch.Tensor, causal: bool,
                     key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the query–key pairs attention sees of x_l², y_l², x_l y_l, and the number of pairs.

    q, k: (B, H, L, d); key_padding_mask (B, L) bool, True = padding (padded tokens are neither queries nor keys);
    causal: pairs j ≤ i only. Returns (sums (H, 3, d), pairs ()) in float32 (float64 for float64 inputs), summed
    over the batch. Pairs are
    within one sequence: the moments of a causal model come from whole calibration sequences, never from the
    sequence being predicted.
    """
    d = q.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    x, y = q.to(acc) * d**-0.25, k.to(acc) * d**-0.25  # (B, H, L, d)
    B, _, L, _ = q.shape
    valid = torch.ones(B, L, dtype=acc, device=q.device)
    if key_padding_mask is not None:
        valid = (~key_padding_mask).to(acc)
    w = valid[:, None, :, None]  # (B, 1, L, 1)
    if causal:
        keys_seen = valid.cumsum(1)[:, None, :, None]  # keys j ≤ i per query i
        queries_seeing = valid.flip(1).cumsum(1).flip(1)[:, None, :, None]  # queries i ≥ j per key j
        sxx = (w * keys_seen * x * x).sum((0, 2))
        syy = (w * queries_seeing * y * y).sum((0, 2))
        sxy = (w * x * (w * y).cumsum(2)).sum((0, 2))
        pairs = (valid * valid.cumsum(1)).sum()
    else:
        n = valid.sum(1)[:, None, None, None]  # (B, 1, 1, 1) real tokens per sequence
        sxx = (n * w * x * x).sum((0, 2))
        syy = (n * w * y * y).sum((0, 2))
        sxy = ((w * x).sum(2) * (w * y).sum(2)).sum(0)
        pairs = (valid.sum(1) ** 2).sum()
    return torch.stack([sxx, syy, sxy], dim=1), pairs


def oprf_inputs(q: torch.Tensor, k: torch.Tensor, P: torch.Tensor, a: torch.Tensor,
                psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q̃, k̃, P̃ such that the FAVOR+ softmax kernel on them computes OPRF with A, Ψ (see the module docstring).

    q, k: (B, H, L, d); P: (m, d); a: (H,) with A < 1/4 (A* ≤ 0); psi: (H, d). Returns q̃, k̃ (B, H, L, d + 2) and
    P̃ (m, d + 2), float32 (float64 for float64 inputs), for ``favor_attention`` / ``favor_step`` / ``favor_weights``
    with the softmax kernel. A = 0 and Ψ = 1 give FAVOR+ (the same attention, up to rounding).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    d = q.shape[-1]
    scale = ((d + 2) / d) ** 0.25  # x̃ = scale · d^(1/4) x̃'' on the first and last block, so x̃'' uses x = d^(-1/4) q
    a = a.to(q.device, acc)
    shrink = torch.sqrt(1 - 4 * a)  # s_h (H,)
    top = shrink.max()
    ratio = (shrink / top)[:, None, None]  # s_h / s ≤ 1, (H, 1, 1)
    rest = torch.sqrt((1 - ratio**2).clamp_min(0))
    offset = (a * (d + 2) ** 0.25)[:, None, None]
    psi = psi.to(q.device, acc)[:, None, :]  # (H, 1, d)

    def augment(x: torch.Tensor) -> torch.Tensor:
        norm = (x * x).sum(-1, keepdim=True).clamp_min(1e-30).sqrt()  # ‖Ψq‖
        return torch.cat([scale * ratio * x, offset.expand_as(norm), scale * rest * norm], dim=-1)

    P = P.to(q.device, acc)
    Pt = torch.cat([top * P, (P * P).sum(-1, keepdim=True), torch.zeros_like(P[:, :1])], dim=1)
    return augment(q.to(acc) * psi), augment(k.to(acc) / psi), Pt


def oprf_features(x: torch.Tensor, P: torch.Tensor, a: float) -> torch.Tensor:
    """The plain OPRF map m^(-1/2) f(ω_j, x) with its constant, so that E[φ(x)·φ(y)] = exp(xᵀy) for Gaussian ω.

    No d^(-1/4) scaling, Ψ, stabiliser or ε (for tests and analysis). x: (..., d), P: (m, d) -> (..., m).
    """
    d = x.shape[-1]
    P = P.to(x.dtype)
    logits = a * (P * P).sum(-1) + (1 - 4 * a) ** 0.5 * x @ P.T - 0.5 * (x * x).sum(-1, keepdim=True)
    return (1 - 4 * a) ** (d / 4) * torch.exp(logits) * P.shape[0] ** -0.5
