"""FAVOR+ on CUDA: forward and backward in fp32 / bf16 / fp16 against a float64 CPU reference, causal == prefix,
padding invariance and decoding step == full causal. Marked ``gpu`` and skipped without CUDA; run them with
``pytest -m gpu`` (``scripts/gpu_check.py`` does). ``PP_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py``
runs the same checks on the CPU, which is how their logic is exercised on machines without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from proteinperformer.attention import favor_attention, favor_step, gaussian_projection

DEVICE = os.environ.get("PP_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative error of output / gradients vs float64 on the same (rounded) inputs: float32 accumulation inside,
# so low precision costs only the rounding of the output and of the incoming gradient
TOL = {"fp32": 1e-4, "bf16": 1.5e-2, "fp16": 2e-3}
# gradients: the incoming gradient is rounded to the low dtype too, and the ReLU kernel's normalised output is
# invariant to the scale of φ(q), so its q-gradient cancels and amplifies that rounding (CPU twin, measured:
# bf16 ≤ 0.038, fp16 ≤ 0.014 for ReLU; softmax passes TOL)
GRAD_TOL = {"fp32": 2e-4, "bf16": 6e-2, "fp16": 2.5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def inputs(L=300, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, L, d, generator=g) for _ in range(3))
    P = gaussian_projection(64, d, generator=g)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[1, L - 77 :] = True
    return q, k, v, P, mask


def on_device(L: int):
    """q, k, v, P of :func:`inputs` on DEVICE."""
    return [t.to(DEVICE) for t in inputs(L=L)[:4]]


def autocast(dtype: str):
    """Autocast to ``dtype`` on DEVICE (off for fp32)."""
    return torch.autocast(torch.device(DEVICE).type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_forward_backward_vs_float64_cpu(kernel: str, causal: bool, dtype: str) -> None:
    q, k, v, P, mask = inputs()
    low = [t.to(DTYPES[dtype]) for t in (q, k, v)]  # the values both runs see
    ref_in = [t.double().requires_grad_() for t in low]
    dev_in = [t.to(DEVICE).requires_grad_() for t in low]
    weight = torch.linspace(-1, 1, q.shape[-1])
    outs, grads = [], []
    for tensors, device, autocast in ((ref_in, "cpu", False), (dev_in, DEVICE, dtype != "fp32")):
        with torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=autocast):
            proj = P.double() if device == "cpu" and not autocast else P.to(device)  # the layer's buffer is fp32
            out = favor_attention(*tensors, proj, kernel=kernel, causal=causal,
                                  key_padding_mask=mask.to(device), chunk_size=64)
        assert torch.isfinite(out).all()
        (out.double() * weight.to(device, torch.float64)).sum().backward()
        outs.append(out)
        grads.append([t.grad for t in tensors])
    assert outs[1].dtype == DTYPES[dtype] and outs[1].device.type == torch.device(DEVICE).type
    keep = ~mask[:, None, :, None].expand_as(q)
    assert rel_err(outs[1][keep.to(DEVICE)], outs[0][keep]) < TOL[dtype]
    for g_dev, g_ref in zip(grads[1], grads[0], strict=True):
        assert rel_err(g_dev, g_ref) < GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_causal_equals_noncausal_on_every_prefix(kernel: str, dtype: str) -> None:
    q, k, v, P = on_device(200)
    with autocast(dtype):
        full = favor_attention(q, k, v, P, kernel=kernel, causal=True, chunk_size=32)
        for i in (0, 31, 32, 99, 199):
            prefix = favor_attention(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], P, kernel=kernel)
            assert rel_err(full[:, :, i], prefix[:, :, i]) < TOL[dtype]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_padding_does_not_change_real_positions(kernel: str, causal: bool) -> None:
    q, k, v, P = on_device(150)
    alone = favor_attention(q[:1, :, :100], k[:1, :, :100], v[:1, :, :100], P, kernel=kernel, causal=causal)
    garbage = torch.randn_like(q[:1, :, 100:]) * 10
    padded = [torch.cat([t[:1, :, :100], garbage], 2) for t in (q, k, v)]
    mask = torch.zeros(1, 150, dtype=torch.bool, device=DEVICE)
    mask[:, 100:] = True
    out = favor_attention(*padded, P, kernel=kernel, causal=causal, key_padding_mask=mask)
    assert rel_err(out[:, :, :100], alone) < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_decoding_step_equals_full_causal(kernel: str, dtype: str) -> None:
    q, k, v, P = on_device(64)
    with autocast(dtype):
        full = favor_attention(q, k, v, P, kernel=kernel, causal=True, chunk_size=16)
        state, rows = None, []
        for t in range(64):
            out, state = favor_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], P, state, kernel)
            rows.append(out)
    assert rel_err(torch.cat(rows, 2), full) < TOL[dtype]
