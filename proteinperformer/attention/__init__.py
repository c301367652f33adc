"""FAVOR+ attention (Choromanski et al. 2020, 2021) and the exact softmax reference: plain torch, no Lightning."""

from .decoding import FavorState, favor_step
from .exact import exact_attention
from .favor import favor_attention
from .features import positive_random_features
from .module import KVCache, MultiheadSelfAttention
from .projection import gaussian_projection
from .redraw import redraw_projections

__all__ = [
    "FavorState",
    "KVCache",
    "MultiheadSelfAttention",
    "exact_attention",
    "favor_attention",
    "favor_step",
    "gaussian_projection",
    "positive_random_features",
    "redraw_projections",
]
