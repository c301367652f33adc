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

REDRAW_STREAM = 0x5245_4452_4157  # "REDRAW": tags the feature draws' stream apart from the data's seeds


def redraw_seed(seed: int, step: int) -> int:
    """The generator seed of the redraw at ``step``: a SplitMix64 hash of (stream tag, seed, step).

    Its own stream: the epoch shuffles seed with ``seed * 1_000_003 + epoch`` (which the redraws once shared, so
    the draw at step s reused the seed of epoch s's permutation) and the examples with ``example_seed``.
    """
    x = (REDRAW_STREAM * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % 2**64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) % 2**64
    return (x ^ (x >> 31)) % 2**63


def redraw_projections(module: torch.nn.Module, seed: int, step: int) -> int:
    """Redraw every FAVOR+ projection in ``module`` deterministically from (seed, step); returns how many.

    Layers draw in module order from one generator stream (seeded by :func:`redraw_seed`), so each layer gets
    a distinct matrix. FAVOR++ layers (``features`` other than "favor+") also fold the query/key statistics
    of the batches since the last redraw into their running A and Ψ (``fold_feature_statistics``).
    """
    gen = torch.Generator().manual_seed(redraw_seed(seed, step))
    n = 0
    for layer in module.modules():
        if isinstance(layer, MultiheadSelfAttention) and layer.projection is not None:
            layer.redraw_projection(gen)
            layer.fold_feature_statistics()
            n += 1
    return n
