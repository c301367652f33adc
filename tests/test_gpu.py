"""FAVOR+ on CUDA: forward and backward in fp32 / bf16 / fp16 against a float64 CPU reference, causal == prefix,
padding invariance and decoding step == full causal (the checks of :mod:`proteinperformer.attention.checks`, which
``pp-gpu-check`` runs too). Marked ``gpu`` and skipped without CUDA; run them with ``pytest -m gpu``.
``PP_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` runs the same checks on the CPU, which is how their
logic is exercised on machines without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from proteinperformer.attention import checks
from proteinperformer.attention.checks import (
    DTYPES,
    GRAD_TOL,
    KERNELS,
    PADDING_TOL,
    TOL,
    decoding_error,
    forward_backward_errors,
    packed_error,
    padding_error,
    prefix_error,
    run_checks,
)

DEVICE = os.environ.get("PP_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_backward_vs_float64_cpu(kernel: str, causal: bool, dtype: str) -> None:
    out_err, grad_err = forward_backward_errors(kernel, causal, dtype, DEVICE)
    assert out_err < TOL[dtype] and grad_err < GRAD_TOL[dtype], (out_err, grad_err)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_equals_noncausal_on_every_prefix(kernel: str, dtype: str) -> None:
    assert prefix_error(kernel, dtype, DEVICE) < TOL[dtype]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_padding_does_not_change_real_positions(kernel: str, causal: bool) -> None:
    assert padding_error(kernel, causal, DEVICE) < PADDING_TOL


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_decoding_step_equals_full_causal(kernel: str, dtype: str) -> None:
    assert decoding_error(kernel, dtype, DEVICE) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_causal_equals_each_document_alone(kernel: str, dtype: str) -> None:
    assert packed_error(kernel, dtype, DEVICE) < TOL[dtype]


def test_flash_linear_attention_matches_our_causal_kernel() -> None:
    """flash-linear-attention's chunk_linear_attn (the optional ``[gpu]`` extra, fla-core) on feature-mapped inputs
    computes the normalised causal sum of a map without a stabiliser (ReLU features): it must equal our kernel on
    packed documents. Our kernel stays the default and the reference; fla's Triton kernels need CUDA."""
    fla = pytest.importorskip("fla.ops.linear_attn", reason="flash-linear-attention (fla-core) is not installed")
    if DEVICE != "cuda":
        pytest.skip("flash-linear-attention's Triton kernels run on CUDA only")
    import inspect

    if "cu_seqlens" not in inspect.signature(fla.chunk_linear_attn).parameters:
        pytest.skip("this fla-core's chunk_linear_attn has no cu_seqlens")
    from proteinperformer.attention.causal import _favor_causal
    from proteinperformer.attention.features import feature_map

    q, k, v, P = (t.to(DEVICE) for t in checks.inputs(L=300)[:4])
    q, k, v = q[:1], k[:1], v[:1]  # (1, H, L, d): packed documents
    cu = torch.tensor([0, 37, 64, 130, 300], device=DEVICE)
    relu = feature_map("relu")
    ours = _favor_causal(q, k, v, P, relu, None, None, 4096, cu_seqlens=cu.int())  # (1, H, L, d)
    qf, kf = relu.features(q, P), relu.features(k, P)  # (1, H, L, m)
    o, _ = fla.chunk_linear_attn(*(t.transpose(1, 2).contiguous() for t in (qf, kf, v)), scale=1.0, normalize=True,
                                 cu_seqlens=cu.long())  # fla's layout: (B, L, H, ·)
    # Triton's fp32 dot may run in TF32 (10-bit mantissa): about 1e-3 relative
    assert checks.rel_err(o.transpose(1, 2), ours) < 5e-3


def test_run_checks_lists_each_check_and_reports_failures_without_raising(monkeypatch) -> None:
    results = run_checks(DEVICE, only="padding")
    assert [r["name"] for r in results] == ["padding softmax noncausal", "padding softmax causal",
                                            "padding relu noncausal", "padding relu causal"]
    assert all(r["passed"] and r["errors"][0] < PADDING_TOL for r in results)

    def lost(*args: object) -> float:
        raise RuntimeError("device lost")

    monkeypatch.setattr(checks, "padding_error", lost)
    monkeypatch.setattr(checks, "decoding_error", lambda *args: float("nan"))
    failed = run_checks(DEVICE, only="padding relu causal")
    assert failed == [{"name": "padding relu causal", "passed": False, "message": "RuntimeError: device lost"}]
    assert [r["passed"] for r in run_checks(DEVICE, only="decoding")] == [False] * 4  # NaN never passes
