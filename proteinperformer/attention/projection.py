"""Random projections for FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

The rows ω_i of the projection are the random directions of the feature map. Orthogonal rows (blocks of
the Q factor of a QR decomposition of a Gaussian matrix) give a lower-variance kernel estimate than iid
rows; row norms are then resampled as χ(d) so each row is still marginally N(0, I).
Follows `gaussian_orthogonal_random_matrix` of the reference (google-research/performer fast_attention).
"""

from __future__ import annotations

import torch


def _orthogonal_blocks(n: int, d: int, generator: torch.Generator | None) -> torch.Tensor:
    """n independent uniformly random d×d orthogonal matrices (rows orthonormal): (n, d, d)."""
    g = torch.randn(n, d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)  # batched
    # sign fix makes the distribution exactly Haar (plain QR is biased by the signs of diag(R))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.transpose(-1, -2)


def gaussian_projection(
    num_features: int,
    head_dim: int,
    orthogonal: bool = True,
    scaling: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a FAVOR+ projection matrix.

    Args:
        num_features: m, the number of random features (rows).
        head_dim: d, the dimension of queries and keys.
        orthogonal: stack ceil(m/d) independent orthogonal blocks (else iid N(0, I) rows).
        scaling: 0 -> row norms resampled as χ(d) (norms of Gaussian vectors), 1 -> all norms sqrt(d).
        generator: optional CPU generator for reproducible draws.
    Returns:
        (m, d) float32 tensor on the CPU.
    """
    if num_features < 1 or head_dim < 1:
        raise ValueError(f"num_features and head_dim must be positive, got {num_features}, {head_dim}")
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 or 1, got {scaling}")
    m, d = num_features, head_dim
    if not orthogonal:
        w = torch.randn(m, d, generator=generator, dtype=torch.float64)
        if scaling == 1:
            w = w / w.norm(dim=1, keepdim=True) * d**0.5
        return w.float()
    w = _orthogonal_blocks((m + d - 1) // d, d, generator).reshape(-1, d)[:m]  # (m, d), unit rows
    if scaling == 0:
        norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)  # χ(d)
    else:
        norms = torch.full((m,), d**0.5, dtype=torch.float64)
    return (w * norms.unsqueeze(1)).float()
