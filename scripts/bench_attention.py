"""Benchmark FAVOR+ (this project) against exact SDPA and performer-pytorch: fwd+bwd time and peak memory.

Choromanski et al. 2021 (Performers); peer: lucidrains/performer-pytorch FastAttention (not a project
dependency: install it in a separate venv, see below; it is skipped with a message when not importable).

    python -m venv .venv-bench && .venv-bench/bin/pip install -c constraints-cpu.txt torch==2.13.0 \\
        performer-pytorch numpy && .venv-bench/bin/pip install -e . --no-deps
    .venv-bench/bin/python scripts/bench_attention.py --out results/bench_attention.json

The timing itself is :mod:`proteinperformer.attention.benchmark` (what ``pp-gpu-check`` runs); this script adds
the peer, one subprocess per case on the CPU, the peak resident memory and the FLOP rates.

Each (method, L) runs in its own subprocess (fresh allocator, clean high-water mark). Time: median over
--repeats of forward + backward of sum(out²) after one warm-up call. Peak memory: the process's
ru_maxrss (peak resident set) after the runs minus its resident set just before the first call, i.e. the
extra memory the attention call needs on top of its inputs (inputs, parameters and the interpreter are
excluded). B=1, 8 heads, head_dim 64, m=256 features, fp32, torch.set_num_threads(all cores, or --threads).
Each length also times a dense fp32 GEMM (``benchmark.gemm_rates``: --repeats + 2 calls of 2048³ after a warm-up) in
its own subprocess with exactly the methods' thread count (every worker reports the threads it ran with, and the
run stops if they differ); the FLOP-rate table reports every method against the median of all GEMM calls of this
run and prints their min / median / max (FLOPs counted as in flops()).

The allocator matters on the CPU: glibc returns freed memory to the system and maps every tensor above 32 MiB
afresh, so each call of a kernel that allocates large buffers pays a page fault per 4 KiB (10-15% of causal FAVOR+'s
time at 16k, as system time). The workers inherit the environment, so
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=67108864`` before the command
keeps freed memory for reuse in every method's process; the JSON's config records the setting (null when unset).

On CUDA (``--device cuda --dtype fp32|bf16``) each method runs all lengths in one process, longest last; peak
memory is ``torch.cuda.max_memory_allocated`` per call, and a length that runs out of memory ends that method
(the longest L that fits is reported). SDPA picks its backend itself: flash for bf16, memory-efficient for fp32.

    python scripts/bench_attention.py --device cuda --dtype bf16 --lengths 1024 4096 16384 65536 --methods exact \
        exact_causal favor favor_causal
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from proteinperformer.attention.benchmark import (
    FEATURES,
    GEMM_N,
    HEAD_DIM,
    HEADS,
    AttentionFn,
    attention_fn,
    gemm_rates,
    longest,
    random_qkv,
    spread,
    time_call,
    time_lengths,
)

METHODS = {
    "exact": "torch SDPA exact",
    "exact_causal": "torch SDPA exact causal",
    "favor": "proteinperformer FAVOR+",
    "favor_causal": "proteinperformer FAVOR+ causal",
    "peer": "performer-pytorch FastAttention",
    "peer_causal": "performer-pytorch causal",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
THREADS = int(os.environ.get("PP_BENCH_THREADS", os.cpu_count()))  # set by --threads for every worker


def flops(method: str, L: int) -> float:
    """Floating-point operations of one fwd+bwd call (B=1, H heads), counted by the algorithm, not the kernel.

    Exact (FlashAttention's convention): forward 4·L²·d per head (QKᵀ and PV), backward 2.5× forward, causal half.
    FAVOR+ / performer-pytorch, causal or not: the matmuls of the linear form with m features, e = d value columns
    plus the normaliser column: forward 2·L·m·(d+1) per feature map (q, k) + 2·L·m·(e+1) for φ(K)ᵀ[V,1] and for
    φ(Q)·kv; backward 2·L·m·(d+1) per feature map and 4·L·m·(e+1) per product. The causal chunked computation does
    more (the masked intra-chunk products), which counts as overhead, not as FLOPs.
    """
    d, m = HEAD_DIM, FEATURES
    if method.startswith("exact"):
        return 3.5 * 4 * L * L * d * HEADS * (0.5 if method.endswith("_causal") else 1.0)
    return (8 * L * m * (d + 1) + 12 * L * m * (d + 1)) * HEADS


def gemm_worker(repeats: int) -> dict:
    """The dense fp32 GEMM reference on this machine now, with the workers' threads: rates of repeats + 2 calls."""
    import torch

    torch.set_num_threads(THREADS)
    return {"method": "gemm", "threads": torch.get_num_threads(), "gflops": gemm_rates(repeats + 2)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(method: str, device: str = "cpu") -> AttentionFn:
    """The package's methods, or the performer-pytorch peer."""
    if not method.startswith("peer"):
        return attention_fn(method, device)
    from performer_pytorch import FastAttention

    fa = FastAttention(dim_heads=HEAD_DIM, nb_features=FEATURES, causal=method.endswith("_causal")).to(device)
    return lambda q, k, v: fa(q, k, v)


def cuda_worker(method: str, lengths: list[int], repeats: int, budget_s: float, dtype: str) -> list[dict]:
    """Time every L for one method on CUDA in this process, stopping at the first out-of-memory length."""
    return time_lengths(method, lengths, "cuda", dtype, repeats, budget_s, fn=_build(method, "cuda"))


def worker(method: str, L: int, repeats: int, budget_s: float) -> dict:
    """Time and measure one (method, L) in this process; returns a result dict."""
    import torch

    torch.set_num_threads(THREADS)
    fn = _build(method)
    q, k, v = random_qkv(L)
    base = _rss_bytes()
    seconds, n, ok = time_call(fn, q, k, v, repeats, budget_s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"method": method, "L": L, "seconds": seconds, "repeats": n, "peak_gib": max(peak, 0) / 2**30,
            "finite": ok, "threads": torch.get_num_threads()}


def run_case(method: str, L: int, repeats: int, budget_s: float) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", method, str(L), str(repeats), str(budget_s)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {method} L={L} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cuda_method(method: str, lengths: list[int], repeats: int, budget_s: float, dtype: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--cuda-worker", method, str(repeats), str(budget_s), dtype,
           "--lengths", *map(str, lengths)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {method} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return []
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        note = "out of memory" if r.get("oom") else f"{r['seconds']:8.4f} s  peak {r['peak_gib']:.2f} GiB"
        print(f"  {METHODS[method]:34s} L={r['L']:6d} {note}", file=sys.stderr, flush=True)
    return results


def print_table(methods: list[str], lengths: list[int], by: dict, cell) -> None:
    """A markdown table: one row per method, one column per length, ``cell(result)`` or "-" where none ran."""
    print("| method | " + " | ".join(str(L) for L in lengths) + " |")
    print("|---" * (len(lengths) + 1) + "|")
    for method in methods:
        cells = ["-" if (r := by.get((method, L))) is None else cell(r) for L in lengths]
        print(f"| {METHODS[method]} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budget", type=float, default=60.0, help="max seconds of timed repeats per case")
    ap.add_argument("--out", default="results/bench_attention.json")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="q/k/v dtype (cuda; the CPU runs fp32)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--gemm-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of every worker, the GEMM reference included (default: all cores). On a "
                         "shared, oversubscribed machine 1 thread avoids timing OpenMP barrier waits")
    ap.add_argument("--cuda-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        os.environ["PP_BENCH_THREADS"] = str(args.threads)  # inherited by the worker subprocesses
    if args.gemm_worker is not None:
        print(json.dumps(gemm_worker(args.gemm_worker)))
        return
    if args.worker:
        method, L, repeats, budget = args.worker
        print(json.dumps(worker(method, int(L), int(repeats), float(budget))))
        return
    if args.cuda_worker:
        method, repeats, budget, dtype = args.cuda_worker
        print(json.dumps(cuda_worker(method, args.lengths, int(repeats), float(budget), dtype)))
        return
    if args.device == "cpu" and args.dtype != "fp32":
        ap.error("--dtype bf16 is for --device cuda (the CPU benchmark is fp32)")

    methods = list(args.methods)
    try:
        import performer_pytorch  # noqa: F401
    except ImportError:
        skipped = [m for m in methods if m.startswith("peer")]
        methods = [m for m in methods if not m.startswith("peer")]
        if skipped:
            print("performer-pytorch is not importable in this interpreter: skipping the peer "
                  "(install it in a separate venv, see the module docstring)", file=sys.stderr)

    results, gemm, gemm_threads = [], [], set()
    if args.device == "cuda":
        for method in methods:
            results.extend(run_cuda_method(method, args.lengths, args.repeats, args.budget, args.dtype))
    else:
        for L in args.lengths:
            proc = subprocess.run([sys.executable, __file__, "--gemm-worker", str(args.repeats)], capture_output=True,
                                  text=True, check=True)
            ref = json.loads(proc.stdout.strip().splitlines()[-1])
            gemm += ref["gflops"]
            gemm_threads.add(ref["threads"])
            sp = spread(ref["gflops"])
            print(f"  dense fp32 GEMM {GEMM_N}^3, {ref['threads']} threads: {sp['median']:.1f} GFLOP/s "
                  f"({sp['min']:.1f}-{sp['max']:.1f})", file=sys.stderr, flush=True)
            for method in methods:
                r = run_case(method, L, args.repeats, args.budget)
                if r is not None:
                    results.append(r)
                    print(f"  {METHODS[method]:34s} L={L:6d} {r['seconds']:8.3f} s  peak {r['peak_gib']:.2f} GiB "
                          f"(n={r['repeats']})", file=sys.stderr, flush=True)
    longest_l = {**dict.fromkeys(methods), **longest(results)}
    threads_seen = gemm_threads | {r["threads"] for r in results if "threads" in r}
    if len(threads_seen) > 1:
        sys.exit(f"error: the workers ran with different thread counts {sorted(threads_seen)}; rerun with --threads")

    by = {(r["method"], r["L"]): r for r in results if not r.get("oom")}
    threads = int(os.environ.get("PP_BENCH_THREADS", os.cpu_count()))
    where = f"{threads} threads" if args.device == "cpu" else f"CUDA, {args.dtype}"
    if args.device == "cpu" and os.environ.get("GLIBC_TUNABLES"):
        where += f", GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    print(f"\nfwd+bwd median seconds (peak GiB), B=1, H={HEADS}, d={HEAD_DIM}, m={FEATURES}, "
          f"{'fp32' if args.device == 'cpu' else args.dtype}, {where}")
    print_table(methods, args.lengths, by, lambda r: f"{r['seconds']:.3f} ({r['peak_gib']:.2f})")
    gemm_spread = spread(gemm) if gemm else None
    if gemm_spread:
        for r in by.values():
            rate = flops(r["method"], r["L"]) / r["seconds"] / 1e9
            r["gflops"], r["gemm_share"] = rate, rate / gemm_spread["median"]
        print(f"\nFLOP rate, GFLOP/s (share of the dense fp32 GEMM rate of this run, {GEMM_N}^3 with the same "
              f"{threads} threads: median {gemm_spread['median']:.1f} GFLOP/s over {len(gemm)} calls, min "
              f"{gemm_spread['min']:.1f}, max {gemm_spread['max']:.1f}); FLOPs as counted in flops()")
        print_table(methods, args.lengths, by, lambda r: f"{r['gflops']:.1f} ({100 * r['gemm_share']:.0f}%)")
    print("\nratios (time of reference / time of FAVOR+; >1 = FAVOR+ faster)")
    for ours, refs in (("favor", ("exact", "peer")), ("favor_causal", ("exact_causal", "peer_causal"))):
        for ref in refs:
            cells = []
            for L in args.lengths:
                a, b = by.get((ours, L)), by.get((ref, L))
                cells.append("-" if a is None or b is None else f"{b['seconds'] / a['seconds']:.2f}x")
            print(f"| {METHODS[ref]} / {METHODS[ours]} | " + " | ".join(cells) + " |")
    print("\nlongest L that ran: " + ", ".join(f"{METHODS[m]} {L}" for m, L in longest_l.items()))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "features": FEATURES,
                                  "dtype": DTYPES[args.dtype], "device": args.device, "threads": threads,
                                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES")},
                       "gemm_gflops": gemm, "gemm": gemm_spread, "longest": longest_l, "results": results}, f,
                      indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
