"""Mixed precision for FAVOR+: every path computes in float32, whatever autocast says.

Under torch.autocast (bf16/fp16, CUDA or CPU) every public entry point and the backward of every custom Function
runs in an autocast-disabled region on float32 copies of its inputs (the exp of the features, the prefix sums and
the normalisers would lose the attention signal in 8 mantissa bits), and the result is returned in the autocast
dtype, as autocast returns a matmul's. Outside autocast the result has v's dtype. float64 inputs stay float64
(gradient checks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast would give a matmul on t's device, or None when autocast is off there."""
    device = t.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _float32_region(fn: Callable) -> Callable:
    """Run fn with autocast disabled on the device of its first tensor argument.

    torch.amp.custom_fwd/custom_bwd would do this for one device type fixed at decoration time; FAVOR+ runs
    on CPU and CUDA alike, so the region is opened for whichever device the tensors are on.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradient checks), everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
