"""What TF32 (trainer.matmul_precision=high) does to FAVOR+'s error, measured on the CPU twin.

TF32 tensor cores read float32 matmul operands with a 10-bit mantissa (as fp16's; float32 has 23 bits) and
accumulate in float32. Here every matmul operand inside FAVOR+'s float32 region is rounded to a 10-bit mantissa
(round to nearest) by a TorchFunctionMode, and, separately, only the region's inputs q, k, v, P. The relative
Frobenius error of the output against float64 exact softmax attention and against float64 FAVOR+ with the same
projection is printed for random q, k (nearly uniform attention) and for sharp clustered attention.

    python studies/tf32_favor_error/tf32_favor_error.py --seeds 2      # -> this study's results/tf32_favor_error.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from proteinperformer.attention import exact_attention, favor_attention, gaussian_projection

MATMULS = {torch.matmul, torch.bmm, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm,
           torch.Tensor.mm}
ADD_MATMULS = {torch.baddbmm, torch.Tensor.baddbmm, torch.Tensor.baddbmm_, torch.addmm, torch.Tensor.addmm_}


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest float32 with a 10-bit mantissa (TF32's input precision); other dtypes unchanged."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view_as(x)


class TF32Operands(TorchFunctionMode):
    """Round both operands of every float32 matmul to TF32 (accumulation stays float32, as on the GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            args = tuple(round_tf32(a) if isinstance(a, torch.Tensor) else a for a in args)
        elif func in ADD_MATMULS:  # C + A·B: only the product's operands are read as TF32 (C is the fp32 accumulator)
            args = (args[0], *(round_tf32(a) if isinstance(a, torch.Tensor) else a for a in args[1:3]), *args[3:])
        return func(*args, **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def inputs(kind: str, L: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # DESIGN.md's setting: q, k ~ N(0, 1)·d^(-1/4) (nearly uniform attention)
        q, k, v = (torch.randn(1, 8, L, d, generator=g, dtype=torch.float64) for _ in range(3))
        return q * d**-0.25, k * d**-0.25, v
    centers = torch.nn.functional.normalize(torch.randn(16, d, generator=g, dtype=torch.float64), dim=-1)
    a, b = torch.randint(16, (8, L), generator=g), torch.randint(16, (8, L), generator=g)
    noise = lambda: 0.1 * torch.randn(8, L, d, generator=g, dtype=torch.float64) / d**0.5  # noqa: E731
    q = (centers[a] + noise()) * 1.5 * d**0.25
    k = (centers[b] + noise()) * 1.5 * d**0.25
    return q[None], k[None], torch.randn(1, 8, L, d, generator=g, dtype=torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "tf32_favor_error.json")
    args = ap.parse_args()
    d, rows = 64, []
    for kind in ("random", "sharp"):
        for causal in (False, True):
            acc = {}
            for seed in range(args.seeds):
                q, k, v = inputs(kind, args.length, d, seed)
                P = gaussian_projection(256, d, generator=torch.Generator().manual_seed(100 + seed))
                exact = exact_attention(q, k, v, causal=causal)
                ref = favor_attention(q, k, v, P.double(), causal=causal)  # float64 FAVOR+
                q32, k32, v32 = q.float(), k.float(), v.float()
                runs = {"fp32": (q32, k32, v32, P), "tf32 inputs": tuple(round_tf32(t) for t in (q32, k32, v32, P))}
                with torch.no_grad():
                    for name, (a, b, c, proj) in runs.items():
                        out = favor_attention(a, b, c, proj, causal=causal)
                        acc.setdefault(name, []).append((rel(out, exact), rel(out, ref)))
                    with TF32Operands():
                        out = favor_attention(q32, k32, v32, P, causal=causal)
                    acc.setdefault("tf32 every matmul", []).append((rel(out, exact), rel(out, ref)))
            for name, errs in acc.items():
                row = {"inputs": kind, "causal": causal, "precision": name,
                       "err_vs_exact": sum(e[0] for e in errs) / len(errs),
                       "err_vs_fp64_favor": sum(e[1] for e in errs) / len(errs)}
                rows.append(row)
                print(f"{kind:6s} causal={causal!s:5s} {name:18s} vs exact softmax {row['err_vs_exact']:.4f}   "
                      f"vs float64 FAVOR+ {row['err_vs_fp64_favor']:.2e}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"length": args.length, "heads": 8, "head_dim": d, "features": 256, "seeds": args.seeds,
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
