"""Numeric precision and devices for running a model, and the hardware checks that go with them.

Training precision is Lightning's (``trainer.precision``, checked by
:func:`proteinperformer.training.precision.check_trainer`); inference precision is one of ``32``, ``bf16``,
``16`` (``--precision`` of every command that runs a model, ``embed()``) and means torch.autocast in that
dtype, as Lightning's ``*-mixed``: weights stay float32, matmuls run in the low dtype, LayerNorm/softmax and
FAVOR+'s feature maps and sums in float32.

The checks turn "this machine cannot do that" into one line that says what to use instead, before Lightning or
torch fail deep inside a traceback.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from proteinperformer.options import DEVICE_CHOICES, INFERENCE_PRECISIONS  # noqa: F401 (re-exported)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
# the Lightning precision plugin that does what an inference precision means
LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class PrecisionError(ValueError):
    """A precision or accelerator this machine cannot run; the message says what to use instead."""


def _device_type(device: str | torch.device) -> str:
    return torch.device("cuda" if str(device) == "gpu" else device).type


@functools.cache  # one probe per dtype and process, not one per batch
def cpu_autocast_works(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(4, 4) @ torch.ones(4, 4)
        return True
    except (RuntimeError, TypeError):
        return False


def check_inference_precision(precision: str, device: str | torch.device = "cpu") -> None:
    """Raise :class:`PrecisionError` unless ``precision`` (32, bf16, 16) can run on ``device``."""
    if precision not in INFERENCE_PRECISIONS:
        raise PrecisionError(f"precision must be one of {INFERENCE_PRECISIONS}, got {precision!r}")
    kind = _device_type(device)
    if kind == "cuda":
        check_cuda(devices=1)
        if precision == "bf16":
            check_cuda_bf16("precision 16 (or 32)")
    elif kind == "cpu" and precision in AUTOCAST_DTYPES and not cpu_autocast_works(AUTOCAST_DTYPES[precision]):
        raise PrecisionError(f"this torch build cannot autocast to precision {precision} on the CPU; use 32 or bf16")


def inference_autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """A context that runs a forward pass at ``precision`` on ``device`` (a no-op for 32)."""
    check_inference_precision(precision, device)
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=AUTOCAST_DTYPES[precision])


def check_cuda(devices: int | str | list = 1) -> None:
    """Raise :class:`PrecisionError` unless CUDA is usable with the requested number of devices."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise PrecisionError(
            f"a GPU was requested but torch {torch.__version__} ({build}) sees no CUDA device; use trainer=cpu "
            "or trainer.accelerator=cpu (pp-embed/pp-generate: --device cpu), or a CUDA build of torch on a GPU machine"
        )
    wanted = len(devices) if isinstance(devices, list | tuple) else devices
    if isinstance(wanted, int) and wanted > torch.cuda.device_count():
        raise PrecisionError(f"{wanted} GPUs requested but {torch.cuda.device_count()} visible; "
                             f"set trainer.devices={torch.cuda.device_count()} (or -1 for all)")


def check_cuda_bf16(instead: str) -> None:
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise PrecisionError(f"{torch.cuda.get_device_name()} has no bfloat16 support; use {instead}")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device a command runs on: ``auto`` is cuda when available, else cpu; ``cpu``, ``cuda``,
    ``cuda:N`` and ``mps`` are checked against this machine. Raises :class:`PrecisionError` (unavailable) or
    ValueError (not a device name) with a one-line message."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device("cuda" if name == "gpu" else name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device; use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        check_cuda(devices=1 if device.index is None else device.index + 1)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PrecisionError("device mps requested but this machine or torch build has no MPS; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported; use {DEVICE_CHOICES}")
    return device
