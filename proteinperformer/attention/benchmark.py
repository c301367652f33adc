"""Time FAVOR+ against exact attention (torch SDPA): forward + backward of one attention call per sequence length.

The core that ``pp-gpu-check`` runs and that ``scripts/bench_attention.py`` (the user-facing benchmark, which adds
performer-pytorch, one subprocess per case on the CPU and FLOP rates) builds on. Shapes: B=1, 8 heads, head_dim
64, m=256 random features. Time: the median over up to ``repeats`` calls of forward + backward of sum(out²), after
one warm-up call that also sets how many repeats fit in ``budget_s``. On CUDA, peak memory is
``torch.cuda.max_memory_allocated`` above what the inputs hold, and SDPA picks its own backend (flash for bf16,
memory-efficient for fp32).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from proteinperformer.attention import exact_attention, favor_attention, gaussian_projection

HEADS, HEAD_DIM, FEATURES = 8, 64, 256
GEMM_N = 2048  # the dense reference: an N×N×N fp32 matmul
METHODS = ("exact", "exact_causal", "favor", "favor_causal")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_fn(method: str, device: str | torch.device = "cpu") -> AttentionFn:
    """``fn(q, k, v)`` of one of :data:`METHODS`; FAVOR+ with a fixed projection (seed 0) on ``device``."""
    if method not in METHODS:
        raise ValueError(f"unknown attention method {method!r}; choose one of {', '.join(METHODS)}")
    causal = method.endswith("_causal")
    if method.startswith("exact"):
        return lambda q, k, v: exact_attention(q, k, v, causal=causal)
    P = gaussian_projection(FEATURES, HEAD_DIM, generator=torch.Generator().manual_seed(0)).to(device)  # (m, d)
    return lambda q, k, v: favor_attention(q, k, v, P, causal=causal)


def random_qkv(L: int, device: str | torch.device = "cpu", dtype: str = "fp32") -> list[torch.Tensor]:
    """q, k, v of shape (1, HEADS, L, HEAD_DIM) in ``dtype`` on ``device`` (seed 0), requiring gradients."""
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(1, HEADS, L, HEAD_DIM, generator=g, device=device, dtype=DTYPES[dtype]).requires_grad_()
            for _ in range(3)]


def time_call(fn: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int,
              budget_s: float) -> tuple[float, int, bool]:
    """(median seconds, repeats run, output finite) of forward + backward of ``fn(q, k, v)``: one warm-up call
    (kernels, allocator), then as many of ``repeats`` calls as fit in ``budget_s`` (at least one). On CUDA the peak
    memory statistics are reset after the warm-up, so ``max_memory_allocated`` afterwards covers the timed calls."""
    cuda = q.is_cuda

    def once() -> tuple[float, bool]:
        q.grad = k.grad = v.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(q, k, v)
        out.float().square().sum().backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, bool(torch.isfinite(out).all())

    first, finite = once()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))  # slow cases get fewer repeats
    times = []
    for _ in range(n):
        seconds, ok = once()
        times.append(seconds)
        finite = finite and ok
    return statistics.median(times), n, finite


def time_lengths(method: str, lengths: list[int], device: str = "cpu", dtype: str = "fp32", repeats: int = 3,
                 budget_s: float = 5.0, fn: AttentionFn | None = None) -> list[dict]:
    """Time ``method`` (or ``fn``, named ``method``) at each length in this process, shortest first; one dict per
    length: method, L, dtype, seconds, repeats, finite and, on CUDA, peak_gib. On CUDA the first length that runs
    out of memory ends the sweep with ``{"method", "L", "dtype", "oom": True}``."""
    fn = fn or attention_fn(method, device)
    cuda = torch.device(device).type == "cuda"
    results = []
    for L in sorted(lengths):
        try:
            q, k, v = random_qkv(L, device, dtype)
            base = torch.cuda.memory_allocated() if cuda else 0
            seconds, n, finite = time_call(fn, q, k, v, repeats, budget_s)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        except torch.cuda.OutOfMemoryError:
            results.append({"method": method, "L": L, "dtype": dtype, "oom": True})
            break
        finally:
            q = k = v = None
            if cuda:
                torch.cuda.empty_cache()
        results.append({"method": method, "L": L, "dtype": dtype, "seconds": seconds, "repeats": n,
                        "finite": finite, "peak_gib": peak})
    return results


def gemm_rates(repeats: int = 5, device: str | torch.device = "cpu", n: int = GEMM_N) -> list[float]:
    """Dense fp32 GEMM rates (GFLOP/s) of ``repeats`` n×n×n matmuls after a warm-up, one per call, with the threads
    torch uses now (``torch.get_num_threads()``: set them as for the attention calls this is the reference of)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    cuda = torch.device(device).type == "cuda"
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first call is the warm-up
            rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return rates


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of a list of measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def longest(results: list[dict]) -> dict[str, int | None]:
    """The longest L that ran (did not run out of memory) for each method in ``results``."""
    methods = dict.fromkeys(r["method"] for r in results)
    return {m: max((r["L"] for r in results if r["method"] == m and not r.get("oom")), default=None) for m in methods}
