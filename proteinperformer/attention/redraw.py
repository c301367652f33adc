"""Deterministic redraw of the FAVOR+ random features (Choromanski et al. 2021, §4; the reference
google-research/performer redraws during training, performer-pytorch every 1000 calls).

Redrawing keeps a model from overfitting one particular draw of ω. Draws are seeded from (seed, step), so
every DDP rank draws the same matrices without communication and a resumed run redraws exactly as the
original. Plain torch: the training callback that calls this every N steps is
``proteinperformer.training.callbacks.FeatureRedrawCallback``.
"""

from __future__ import annotations

import torch

from .module import MultiheadSelfAttention


def redraw_projections(module: torch.nn.Module, seed: int, step: int) -> int:
    """Redraw every FAVOR+ projection in ``module`` deterministically from (seed, step); returns how many.

    Layers draw in module order from one generator stream, so each layer gets a distinct matrix.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = 0
    for layer in module.modules():
        if isinstance(layer, MultiheadSelfAttention) and layer.projection is not None:
            layer.redraw_projection(gen)
            n += 1
    return n
