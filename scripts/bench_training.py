"""Training throughput: Performer variants (FAVOR+ ReLU with / without projection, softmax) vs the Transformer.

One training step = forward + MLM loss + backward + gradient clipping + AdamW step, for the paper's network
(``--size paper``: 6 layers, width 512, 8 heads, MLP 2048, learned positions) or the reference checkpoint's
(``--size reference``: 6 × 192, 6 heads, MLP 768, sinusoidal positions), at each ``--shapes BATCHxLENGTH``.
Every (model, shape) runs in a fresh process so that its peak memory is its own: on CPU the peak resident set
size (includes weights and AdamW state), on CUDA ``torch.cuda.max_memory_allocated``.

Reported per row: tokens/s, the ratio to the Transformer at the same shape (same run), and model FLOP
utilisation (MFU): the step's model FLOPs (6 × non-embedding parameters × tokens for the dense layers, plus
the attention's own matmuls: exact 12·L²·D per layer, FAVOR+ 12·L·m·D + the feature maps) per second, divided
by the machine's dense GEMM rate measured in the same run (a 1024³ fp32 matmul with the same threads).
The profile columns split the step: "attention" is depth × the forward + backward of one layer's attention core
alone (q, k, v -> heads' outputs, timed separately at the same shape), "rest" the step minus that (QKV and
output projections, feed-forward, embeddings, loss, AdamW). It shows where FAVOR+ loses at short L.

    python scripts/bench_training.py --size reference --shapes 16x256 4x1024 --threads 2 --repeats 3
    python scripts/bench_training.py --size paper --shapes 4x1024 --repeats 2
    python scripts/bench_training.py --device cuda --precision bf16 --shapes 8x1024 1x8192 --out /tmp/bench_gpu.json

Results go into one file, ``results/bench_training.json`` by default, under one key per size and shape set
(``reference_16x256_4x1024``, ``paper_4x1024``, ...): a run replaces its own key and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

MODELS = {  # conf/model/*.yaml, and the variants the throughput question is about
    "performer_relu": {"attention": "favor", "kernel": "relu", "use_projection": False},  # the default
    "performer_relu_m256": {"attention": "favor", "kernel": "relu", "use_projection": True},
    "performer_softmax": {"attention": "favor", "kernel": "softmax"},
    "performer_softmax_m64": {"attention": "favor", "kernel": "softmax", "num_features": 64},
    "transformer": {"attention": "exact"},
}
SIZES = {
    "paper": {"dim": 512, "depth": 6, "heads": 8, "ff_dim": 2048, "num_features": 256, "positions": "learned"},
    "reference": {"dim": 192, "depth": 6, "heads": 6, "ff_dim": 768, "num_features": 256, "positions": "sinusoidal"},
}


def _rss_gib() -> float:
    """Current resident set size of this process in GiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def seconds_of(fn, device: str) -> float:
    """Wall seconds of one call of ``fn`` (on CUDA, with the queued kernels finished before and after)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def gemm_flops_per_sec(device: str, threads: int, n: int = 1024, repeats: int = 20) -> float:
    """Dense fp32 matmul rate of this machine: the fastest of ``repeats`` n×n×n products (the attainable peak;
    a median of 5 once read 69 instead of 136 GFLOP/s on a VM whose neighbours were busy, giving MFU > 100%)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    return 2 * n**3 / min(seconds_of(lambda: a @ b, device) for _ in range(repeats))


def step_flops(cfg: dict, batch: int, length: int, dense_params: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 × forward)."""
    tokens = batch * length
    D, depth, m = cfg["dim"], cfg["depth"], cfg["num_features"]
    hd = D // cfg["heads"]
    if cfg["attention"] == "exact":
        attn = 4 * length * length * D  # QKᵀ and AV, forward, per sequence and layer
    else:
        projected = cfg.get("kernel") == "softmax" or cfg.get("use_projection", True)
        feats = m if projected else hd  # relu without projection: φ(x) = relu(x) + ε, elementwise
        projection = 2 * 2 * length * (hd + 1) * feats if projected else 0  # φ(Q), φ(K) (softmax: +‖x‖² column)
        attn = cfg["heads"] * (projection + 2 * 2 * length * feats * (hd + 1))  # φ(K)ᵀ[V,1], then φ(Q)·that
    return 3 * (2 * dense_params * tokens + depth * batch * attn)


def bench_one(
    model: str, size: str, batch: int, length: int, repeats: int, warmup: int, device: str, precision: str,
    threads: int,
) -> dict:
    """Median seconds of ``repeats`` training steps (after ``warmup`` untimed ones) of one model at one shape."""
    from proteinperformer.data.collate import MLMCollator
    from proteinperformer.tokenizer import Alphabet
    from proteinperformer.training.lm import ProteinLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = {**SIZES[size], **MODELS[model], "max_positions": length}
    lm = ProteinLM(cfg, task="mlm").to(device).train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    alphabet = Alphabet()
    g = torch.Generator().manual_seed(0)
    items = [{"tokens": torch.randint(alphabet.standard_ids[0], alphabet.standard_ids[-1] + 1, (length,),
                                      generator=g), "seed": i} for i in range(batch)]
    batch_t = {k: v.to(device) for k, v in MLMCollator(alphabet)(items).items()}
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    cuda = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = lm.model_step(batch_t)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rss_before = _rss_gib()
    for _ in range(warmup):  # allocations, AdamW state
        step()
    seconds = statistics.median(seconds_of(step, device) for _ in range(repeats))
    attention_seconds = cfg["depth"] * attention_core_seconds(lm.model, batch, length, repeats, device, dtype)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    embeddings = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" in n or "position" in n)
    dense = lm.model.num_parameters() - embeddings
    return {"model": model, "size": size, "batch": batch, "length": length, "seconds_per_step": seconds,
            "tokens_per_sec": batch * length / seconds, "flops_per_step": step_flops(cfg, batch, length, dense),
            "attention_seconds_per_step": attention_seconds,
            "peak_memory_gib": peak, "memory_before_step_gib": rss_before if not cuda else None,
            "parameters": lm.model.num_parameters()}


def attention_core_seconds(net, batch: int, length: int, repeats: int, device: str, dtype) -> float:
    """Median seconds of forward + backward of one layer's attention core alone (exact SDPA or FAVOR+, from
    q, k, v (B, H, L, head_dim) to the heads' outputs; no QKV/output projections): the profile that shows how
    much of a step is attention, and so where the Performer's time goes at short L."""
    from proteinperformer.attention.exact import exact_attention
    from proteinperformer.attention.favor import favor_attention

    layer = next(m for m in net.modules() if hasattr(m, "split_heads"))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, layer.heads, length, layer.head_dim, generator=g).to(device).requires_grad_()
               for _ in range(3))
    grad = torch.randn(batch, layer.heads, length, layer.head_dim, generator=g).to(device)

    def core() -> None:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            if layer.attention == "exact":
                y = exact_attention(q, k, v, causal=layer.causal)
            else:
                y = favor_attention(q, k, v, layer.projection, kernel=layer.kernel, causal=layer.causal)
        y.backward(grad)

    core()
    return statistics.median(seconds_of(core, device) for _ in range(repeats))


def parse_shape(text: str) -> tuple[int, int]:
    """'16x256' -> (16, 256)."""
    try:
        batch, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be BATCHxLENGTH, e.g. 16x256; got {text!r}") from None
    return batch, length


def run(args: argparse.Namespace) -> dict:
    """Benchmark every model at every shape, each in its own process; returns the JSON payload."""
    gemm = gemm_flops_per_sec(args.device, args.threads)
    print(f"dense fp32 GEMM rate: {gemm / 1e9:.1f} GFLOP/s ({args.threads} threads)", flush=True)
    results = []
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for batch, length in args.shapes:
            for model in args.models:
                r = pool.submit(bench_one, model, args.size, batch, length, args.repeats, args.warmup, args.device,
                                args.precision, args.threads).result()
                print(f"  {model:22s} {batch}x{length:<6d} {r['seconds_per_step']:8.3f} s/step", flush=True)
                results.append(r)
    for r in results:
        ref = next((x for x in results if x["model"] == "transformer" and (x["batch"], x["length"]) ==
                    (r["batch"], r["length"])), None)
        r["speedup_vs_transformer"] = r["tokens_per_sec"] / ref["tokens_per_sec"] if ref else None
        r["mfu"] = r["flops_per_step"] / r["seconds_per_step"] / gemm
    return {"device": args.device, "precision": args.precision, "threads": args.threads, "size": args.size,
            "model_config": SIZES[args.size], "gemm_flops_per_sec": gemm, "repeats": args.repeats,
            "warmup": args.warmup, "results": results}


def format_table(payload: dict) -> str:
    """Markdown table of the results (one row per model and shape)."""
    lines = ["| model | batch × L | s/step | tokens/s | × Transformer | attention s/step (share) | rest s/step | MFU "
             "| peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        ratio = f"{r['speedup_vs_transformer']:.2f}" if r["speedup_vs_transformer"] else "-"
        att = r["attention_seconds_per_step"]
        lines.append(f"| {r['model']} | {r['batch']} × {r['length']} | {r['seconds_per_step']:.3f} | "
                     f"{r['tokens_per_sec']:,.0f} | {ratio} | {att:.3f} ({100 * att / r['seconds_per_step']:.0f}%) | "
                     f"{r['seconds_per_step'] - att:.3f} | {100 * r['mfu']:.1f}% | {r['peak_memory_gib']:.2f} |")
    return "\n".join(lines)


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="paper")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(1, 1024), (1, 8192)],
                        help="BATCHxLENGTH per run (default 1x1024 1x8192)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (0 on a slow CPU at 8192)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results/bench_training.json",
                        help="JSON file the run is written into, under the key SIZE_BxL_... (other keys are kept)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = create_parser().parse_args(argv)
    payload = run(args)
    print(format_table(payload))
    key = "_".join([args.size, *(f"{b}x{n}" for b, n in args.shapes)])
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[key] = payload
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")
    print(f"wrote {args.out} [{key}]")


if __name__ == "__main__":
    main()
