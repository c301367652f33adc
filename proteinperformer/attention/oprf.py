"""FAVOR++: optimal positive random features (OPRF) and per-dimension rescaling, as inputs to the FAVOR+ kernel.

Likhosherstov, Choromanski et al., "Chefs' Random Tables: Non-Trigonometric Random Features" (NeurIPS 2022), and
the rescaling of their "dense-exponential random features" (SADERF, "FAVOR#", 2023). With x = d^(-1/4) q,
y = d^(-1/4) k and ω ~ N(0, I_d), for any A < 1/4

    f(ω, x) = (1 − 4A)^(d/4) exp(A‖ω‖² + √(1 − 4A) ωᵀx − ‖x‖²/2),    E[f(ω, x) f(ω, y)] = exp(xᵀy),

and A = 0 is FAVOR+'s positive random feature. The variance is smallest at
A* = (1 − 2r − √((2r + 1)² + 8r)) / 16 with r = Φ/d and Φ the mean of ‖x + y‖² over the query–key pairs the
attention sees (A* ≤ 0; trained queries and keys have large norms, where FAVOR+'s variance explodes). Rescaling
x → Ψx, y → Ψ⁻¹y with Ψ_l = (Σ y_l² / Σ x_l²)^(1/4) leaves xᵀy unchanged and minimises Φ over diagonal Ψ.

The dense version (``oprf-dense``) goes two steps further, both free of any change to the attention:
  * a full matrix, x → Mx, y → M⁻ᵀy (xᵀy unchanged): with C_x, C_y the pair covariances of x and y, Φ is smallest
    for the symmetric M = S^(1/2), S = C_x^(-1/2) (C_x^(1/2) C_y C_x^(1/2))^(1/2) C_x^(-1/2) (S C_x S = C_y: the
    matrix geometric mean of C_x⁻¹ and C_y; diagonal C's give Ψ² back);
  * a key shift, y → y − c: xᵀ(y − c) = xᵀy − xᵀc changes every key's logit of a query by the same amount, which the
    softmax (and FAVOR's normaliser) cancels. Φ(c) = E‖Mx + M⁻ᵀy − c‖² is smallest at c = E[Mx + M⁻ᵀy]: trained keys
    share a large common component (and queries one that no single key needs to reproduce), and removing it is
    what brings most of the gain (IgLM-S, m = 256: see studies/fig5_iglm/README.md).

The names users pass (``features``): ``favor+`` (A = 0, Ψ = 1: today's FAVOR+), ``oprf`` (A* on the raw q, k),
``oprf-rescaled`` (Ψ, then A* on Ψq, Ψ⁻¹k) and ``oprf-dense`` (M and c, then A* on Mq, M⁻ᵀk − c). A, Ψ, M and c
are statistics per layer × head, calibrated on sequences (:func:`proteinperformer.model.calibration.
calibrate_features`) from the pair moments below and then frozen.

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

from .precision import _float32_region

MOMENTS = 3  # pair means of x_l², y_l², x_l y_l (x = d^(-1/4) q, y = d^(-1/4) k): (H, 3, d)


def moment_rows(features: str, d: int) -> int:
    """Rows of a layer's pair moments (H, rows, d): 3 (diagonal: x_l², y_l², x_l y_l), or for ``oprf-dense``
    2d + 3 (E[xxᵀ], E[yyᵀ], then E[x], E[y] and E[x_l y_l])."""
    return 2 * d + 3 if features == "oprf-dense" else MOMENTS


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


def convert_moments(moments: torch.Tensor, features: str) -> torch.Tensor | None:
    """A layer's pair moments (H, rows, d) in the layout of ``features`` (:func:`moment_rows`): the same, the
    diagonal of dense ones, or None where they lack what ``features`` needs (diagonal -> dense: calibrate again)."""
    H, rows, d = moments.shape
    if rows == moment_rows(features, d):
        return moments
    if rows == moment_rows("oprf-dense", d):
        diag = [moments[:, :d].diagonal(dim1=-2, dim2=-1), moments[:, d : 2 * d].diagonal(dim1=-2, dim2=-1)]
        return torch.stack([*diag, moments[:, 2 * d + 2]], dim=1)
    return None


def _sym_power(S: torch.Tensor, p: float) -> torch.Tensor:
    """S^p of symmetric positive semi-definite matrices (..., d, d), eigenvalues floored at 1e-12 of the largest."""
    e, U = torch.linalg.eigh(S)
    e = e.clamp_min(1e-12 * e.amax(-1, keepdim=True).clamp_min(1e-300))
    return (U * e.unsqueeze(-2) ** p) @ U.transpose(-1, -2)


def _ridge(C: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """C + rel·(tr C / d)·I for covariances (..., d, d): a direction the calibration never saw (a dead coordinate)
    would otherwise give M a condition number that float32 q, k cannot carry through M and M⁻ᵀ."""
    d = C.shape[-1]
    scale = C.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return C + rel * scale * torch.eye(d, dtype=C.dtype)


def dense_parameters(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (H,) and the maps (H, 2, d + 1, d) of ``oprf-dense`` from its pair moments (H, 2d + 3, d) (float64).

    maps[:, 0, :d] = M (applied to x), maps[:, 1, :d] = M⁻ᵀ (applied to y) and maps[:, 1, d] = c, the key shift in
    the units of M⁻ᵀy (maps[:, 0, d] = 0). All zero moments (uncalibrated) give M = I, c = 0, A = 0: FAVOR+.
    """
    H, _, d = moments.shape
    xx, yy = moments[:, :d], moments[:, d : 2 * d]
    mx, my, xy = moments[:, 2 * d], moments[:, 2 * d + 1], moments[:, 2 * d + 2]
    eye = torch.eye(d, dtype=moments.dtype)
    maps = torch.zeros(H, 2, d + 1, d, dtype=moments.dtype)
    maps[:, :, :d] = eye
    a = torch.zeros(H, dtype=moments.dtype)
    ok = (xx.diagonal(dim1=-2, dim2=-1).sum(-1) > 0) & (yy.diagonal(dim1=-2, dim2=-1).sum(-1) > 0)
    if not ok.any():
        return a, maps
    cx = _ridge(xx[ok] - mx[ok, :, None] * mx[ok, None, :])  # pair covariances
    cy = _ridge(yy[ok] - my[ok, :, None] * my[ok, None, :])
    root, inv_root = _sym_power(cx, 0.5), _sym_power(cx, -0.5)
    S = inv_root @ _sym_power(root @ cy @ root, 0.5) @ inv_root  # S C_x S = C_y
    M = _sym_power(S, 0.5)
    Mt = _sym_power(S, -0.5)  # M⁻ᵀ = M⁻¹ (M symmetric)
    c = (M @ mx[ok, :, None] + Mt @ my[ok, :, None]).squeeze(-1)  # E[Mx + M⁻ᵀy]
    # Φ = E‖Mx + M⁻ᵀy − c‖² = tr(M E[xxᵀ] M) + tr(M⁻ᵀ E[yyᵀ] M⁻¹) + 2 E[xᵀy] − ‖c‖² (c the mean of the sum)
    phi = ((M @ xx[ok] @ M).diagonal(dim1=-2, dim2=-1).sum(-1) + (Mt @ yy[ok] @ Mt).diagonal(dim1=-2, dim2=-1).sum(-1)
           + 2 * xy[ok].sum(-1) - (c * c).sum(-1))
    a[ok] = optimal_a(phi, d)
    maps[ok, 0, :d], maps[ok, 1, :d], maps[ok, 1, d] = M, Mt, c
    return a, maps


@_float32_region
def dense_inputs(q: torch.Tensor, k: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mq and M⁻ᵀk − c d^(1/4) per head (q, k (B, H, L, d), maps (H, 2, d + 1, d), see :func:`dense_parameters`):
    q̃ᵀk̃ = qᵀk − qᵀM c d^(1/4), the same for every key of a query, so the attention is unchanged. Computed in
    float32 (float64 for float64 inputs) whatever autocast says, as the kernel that takes them."""
    d = q.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, maps = q.to(acc), k.to(acc), maps.to(q.device, acc)
    qm = q @ maps[:, 0, :d].transpose(-1, -2).unsqueeze(0)
    km = k @ maps[:, 1, :d].transpose(-1, -2).unsqueeze(0) - d**0.25 * maps[:, 1, d][None, :, None, :]
    return qm, km


def feature_parameters(moments: torch.Tensor, features: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (H,) and Ψ (H, d) of ``features`` from the pair moments (H, 3, d) (all zero: A = 0, Ψ = 1, FAVOR+).

    Φ(Ψ) = Σ_l Ψ_l² E[x_l²] + Ψ_l⁻² E[y_l²] + 2 E[x_l y_l], the mean of ‖Ψx + Ψ⁻¹y‖² over the pairs.
    """
    check_features(features)
    if features == "oprf-dense":
        raise ValueError("oprf-dense has a full matrix and a key shift, not Ψ: use dense_parameters(moments)")
    H, _, d = moments.shape
    psi = rescaling(moments) if features == "oprf-rescaled" else torch.ones(H, d, dtype=moments.dtype)
    phi = (psi**2 * moments[:, 0] + moments[:, 1] / psi**2 + 2 * moments[:, 2]).sum(-1)
    a = optimal_a(phi, d) if features != "favor+" else torch.zeros(H, dtype=moments.dtype)
    return a, psi


def pair_moment_sums(q: torch.Tensor, k: torch.Tensor, causal: bool,
                     key_padding_mask: torch.Tensor | None = None,
                     dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the query–key pairs attention sees of x_l², y_l², x_l y_l, and the number of pairs.

    q, k: (B, H, L, d); key_padding_mask (B, L) bool, True = padding (padded tokens are neither queries nor keys);
    causal: pairs j ≤ i only. Returns (sums (H, 3, d), pairs ()) in float32 (float64 for float64 inputs), summed
    over the batch; ``dense``: sums (H, 2d + 3, d) of x xᵀ, y yᵀ, x, y and x_l y_l (:func:`moment_rows`). Pairs are
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
        wx, wy = w * keys_seen, w * queries_seeing  # (B, 1, L, 1): pairs each query / key is in
    else:
        n = valid.sum(1)[:, None, None, None]  # (B, 1, 1, 1) real tokens per sequence
        sxx = (n * w * x * x).sum((0, 2))
        syy = (n * w * y * y).sum((0, 2))
        sxy = ((w * x).sum(2) * (w * y).sum(2)).sum(0)
        pairs = (valid.sum(1) ** 2).sum()
        wx = wy = n * w
    if dense:
        xxt = torch.einsum("bhld,bhle->hde", wx * x, x)
        yyt = torch.einsum("bhld,bhle->hde", wy * y, y)
        means = torch.stack([(wx * x).sum((0, 2)), (wy * y).sum((0, 2)), sxy], dim=1)
        return torch.cat([xxt, yyt, means], dim=1), pairs
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
