"""FAVOR+ attention (Choromanski et al. 2020, 2021) and the exact softmax reference."""

from .exact import exact_attention
from .favor import FavorState, favor_attention, favor_step, positive_random_features
from .module import KVCache, MultiheadSelfAttention
from .projection import gaussian_projection
from .redraw import FeatureRedrawCallback

__all__ = [
    "FavorState",
    "FeatureRedrawCallback",
    "KVCache",
    "MultiheadSelfAttention",
    "exact_attention",
    "favor_attention",
    "favor_step",
    "gaussian_projection",
    "positive_random_features",
]
