"""FAVOR+ on a device against the definition: the numerical checks that ``pp-gpu-check`` runs on a GPU node and
``tests/test_gpu.py`` asserts (``PP_GPU_TEST_DEVICE=cpu`` runs them on the CPU).

- forward and backward in fp32 / bf16 / fp16 (autocast) against float64 on the CPU, from the same rounded inputs;
- causal == noncausal on every prefix; padding does not change the real positions; one decoding step at a time
  (:func:`favor_step`) == the full causal call; causal on packed documents (``cu_seqlens``) == each document alone.

Each check returns a relative error; :func:`run_checks` compares it with its tolerance and never raises, so a
report can list every check.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from proteinperformer.attention import favor_attention, favor_step, gaussian_projection
from proteinperformer.attention.causal import _favor_causal
from proteinperformer.attention.features import feature_map

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = ("softmax", "relu")
# relative error of output / gradients vs float64 on the same (rounded) inputs: float32 accumulation inside,
# so low precision costs only the rounding of the output and of the incoming gradient
TOL = {"fp32": 1e-4, "bf16": 1.5e-2, "fp16": 2e-3}
# gradients: the incoming gradient is rounded to the low dtype too, and the ReLU kernel's normalised output is
# invariant to the scale of φ(q), so its q-gradient cancels and amplifies that rounding (CPU twin, measured:
# bf16 ≤ 0.038, fp16 ≤ 0.014 for ReLU; softmax passes TOL)
GRAD_TOL = {"fp32": 2e-4, "bf16": 6e-2, "fp16": 2.5e-2}
PADDING_TOL = 1e-5  # fp32: padded keys must contribute exactly nothing


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 on the CPU (NaN when either holds a NaN, so a non-finite result never passes)."""
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def inputs(L: int = 300, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v of shape (2, 4, L, d), a 64-feature projection and a key padding mask (last 77 keys of row 1), CPU."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, L, d, generator=g) for _ in range(3))  # (B, H, L, d)
    P = gaussian_projection(64, d, generator=g)  # (m, d)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[1, L - 77 :] = True
    return q, k, v, P, mask


def _autocast(device: str, dtype: str) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (off for fp32)."""
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def forward_backward_errors(kernel: str, causal: bool, dtype: str, device: str) -> tuple[float, float]:
    """(output error, worst gradient error) of FAVOR+ on ``device`` under ``dtype`` vs float64 on the CPU, with a
    padding mask, outside the padded positions. Raises RuntimeError when the output is not in ``dtype`` on
    ``device`` (autocast did not apply)."""
    q, k, v, P, mask = inputs()
    low = [t.to(DTYPES[dtype]) for t in (q, k, v)]  # the values both runs see
    ref_in = [t.double().requires_grad_() for t in low]
    dev_in = [t.to(device).requires_grad_() for t in low]
    weight = torch.linspace(-1, 1, q.shape[-1], dtype=torch.float64)
    outs, grads = [], []
    for tensors, where, low_precision in ((ref_in, "cpu", False), (dev_in, device, dtype != "fp32")):
        with torch.autocast(torch.device(where).type, dtype=DTYPES[dtype], enabled=low_precision):
            proj = P.double() if where == "cpu" and not low_precision else P.to(where)  # the layer's buffer is fp32
            out = favor_attention(*tensors, proj, kernel=kernel, causal=causal, key_padding_mask=mask.to(where),
                                  chunk_size=64)
        (out.double() * weight.to(where)).sum().backward()
        outs.append(out)
        grads.append([t.grad for t in tensors])
    if outs[1].dtype != DTYPES[dtype] or outs[1].device.type != torch.device(device).type:
        raise RuntimeError(f"output is {outs[1].dtype} on {outs[1].device}, expected {DTYPES[dtype]} on {device}")
    keep = ~mask[:, None, :, None].expand_as(q)  # (B, H, L, d): the real positions
    out_err = rel_err(outs[1].cpu()[keep], outs[0][keep])
    grad_err = max(rel_err(g_dev, g_ref) for g_dev, g_ref in zip(grads[1], grads[0], strict=True))
    return out_err, grad_err


def prefix_error(kernel: str, dtype: str, device: str) -> float:
    """Worst error between causal FAVOR+ at position i and noncausal FAVOR+ on the prefix ending at i."""
    q, k, v, P = (t.to(device) for t in inputs(L=200)[:4])
    worst = 0.0
    with _autocast(device, dtype):
        full = favor_attention(q, k, v, P, kernel=kernel, causal=True, chunk_size=32)
        for i in (0, 31, 32, 99, 199):  # chunk edges and the last position
            prefix = favor_attention(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], P, kernel=kernel)
            worst = max(worst, rel_err(full[:, :, i], prefix[:, :, i]))
    return worst


def padding_error(kernel: str, causal: bool, device: str) -> float:
    """Error between 100 positions alone and the same 100 followed by 50 masked keys of large random values."""
    q, k, v, P = (t.to(device) for t in inputs(L=150)[:4])
    alone = favor_attention(q[:1, :, :100], k[:1, :, :100], v[:1, :, :100], P, kernel=kernel, causal=causal)
    garbage = torch.randn_like(q[:1, :, 100:]) * 10
    padded = [torch.cat([t[:1, :, :100], garbage], 2) for t in (q, k, v)]
    mask = torch.zeros(1, 150, dtype=torch.bool, device=device)
    mask[:, 100:] = True
    out = favor_attention(*padded, P, kernel=kernel, causal=causal, key_padding_mask=mask)
    return rel_err(out[:, :, :100], alone)


def decoding_error(kernel: str, dtype: str, device: str) -> float:
    """Error between 64 single-token decoding steps (:func:`favor_step`) and one full causal call."""
    q, k, v, P = (t.to(device) for t in inputs(L=64)[:4])
    with _autocast(device, dtype):
        full = favor_attention(q, k, v, P, kernel=kernel, causal=True, chunk_size=16)
        state, rows = None, []
        for t in range(64):
            out, state = favor_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], P, state, kernel)
            rows.append(out)
    return rel_err(torch.cat(rows, 2), full)


def packed_error(kernel: str, dtype: str, device: str) -> float:
    """Error between causal FAVOR+ on four packed documents (``cu_seqlens``; starts inside and on chunk edges) and
    each document run alone."""
    q, k, v, P = (t[:1].to(device) if t.dim() == 4 else t.to(device) for t in inputs(L=200)[:4])
    offsets = [0, 37, 64, 130, 200]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    fmap = feature_map(kernel)
    with _autocast(device, dtype):
        packed = _favor_causal(q, k, v, P, fmap, None, 32, 4096, cu_seqlens=cu)
        alone = [_favor_causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], P, fmap, None, 32, 4096)
                 for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return rel_err(packed, torch.cat(alone, 2))


def _checks(device: str) -> list[tuple[str, Callable[[], float | tuple[float, ...]], tuple[float, ...]]]:
    """(name, function returning the error or errors, tolerance of each error) of every check, in report order."""
    checks = []
    for kernel in KERNELS:
        for causal in (False, True):
            mode = "causal" if causal else "noncausal"
            for dtype in DTYPES:
                checks.append((f"forward/backward {kernel} {mode} {dtype}",
                               partial(forward_backward_errors, kernel, causal, dtype, device),
                               (TOL[dtype], GRAD_TOL[dtype])))
            checks.append((f"padding {kernel} {mode}", partial(padding_error, kernel, causal, device), (PADDING_TOL,)))
        for dtype in ("fp32", "bf16"):
            checks.append((f"prefix {kernel} {dtype}", partial(prefix_error, kernel, dtype, device), (TOL[dtype],)))
            checks.append((f"decoding {kernel} {dtype}", partial(decoding_error, kernel, dtype, device), (TOL[dtype],)))
            checks.append((f"packed {kernel} {dtype}", partial(packed_error, kernel, dtype, device), (TOL[dtype],)))
    return checks


def run_checks(device: str, only: str | None = None) -> list[dict]:
    """Run every check (``only``: those whose name starts with it, e.g. "padding") on ``device``. One dict each:
    name, errors, tolerances, passed, and for a check that raised, its message instead of the errors."""
    results = []
    for name, measure, tolerances in _checks(device):
        if only is not None and not name.startswith(only):
            continue
        try:
            errors = measure()
        except Exception as err:  # noqa: BLE001 - a report lists every check, the failing ones with the reason
            results.append({"name": name, "passed": False, "message": f"{type(err).__name__}: {err}"})
            continue
        errors = errors if isinstance(errors, tuple) else (errors,)
        results.append({"name": name, "errors": list(errors), "tolerances": list(tolerances),
                        "passed": all(e < t for e, t in zip(errors, tolerances, strict=True))})
    return results
