"""Training throughput of the paper's model: Performer (FAVOR+ softmax, ReLU) vs Transformer (exact attention).

One training step = forward + MLM loss + backward + gradient clipping + AdamW step, batch 1, for the paper's
network (6 layers, width 512, 8 heads, MLP 2048, learned positions) at each length. Every (model, length)
runs in a fresh process so that its peak memory is its own: on CPU the peak resident set size (includes
the ~0.3 GiB of weights and AdamW state), on CUDA ``torch.cuda.max_memory_allocated``. Prints a table with
tokens/s and the ratio to the Transformer at the same length, and writes JSON (``--out``).

    python scripts/bench_training.py --lengths 1024 8192 --out bench_training.json
    python scripts/bench_training.py --device cuda --precision bf16 --lengths 1024 8192 16384
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

MODELS = {  # conf/model/*.yaml
    "performer_softmax": {"attention": "favor", "kernel": "softmax"},
    "performer_relu": {"attention": "favor", "kernel": "relu"},
    "transformer": {"attention": "exact"},
}
PAPER = {"dim": 512, "depth": 6, "heads": 8, "ff_dim": 2048, "num_features": 256, "positions": "learned"}


def _rss_gib() -> float:
    """Current resident set size of this process in GiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def bench_one(
    model: str, length: int, repeats: int, warmup: int, device: str, precision: str, threads: int
) -> dict:
    """Median seconds of ``repeats`` training steps (after ``warmup`` untimed ones) of one model at one length."""
    from proteinperformer.data.collate import MLMCollator
    from proteinperformer.lm import ProteinLM
    from proteinperformer.tokenizer import Alphabet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm = ProteinLM({**PAPER, **MODELS[model], "max_positions": length}, task="mlm").to(device).train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    alphabet = Alphabet()
    tokens = torch.randint(alphabet.standard_ids[0], alphabet.standard_ids[-1] + 1, (length,))
    batch = {k: v.to(device) for k, v in MLMCollator(alphabet)([{"tokens": tokens, "seed": 0}]).items()}
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    cuda = device.startswith("cuda")

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = lm.model_step(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rss_before = _rss_gib()
    for _ in range(warmup):  # allocations, AdamW state
        step()
    seconds = statistics.median(step() for _ in range(repeats))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"model": model, "length": length, "seconds_per_step": seconds, "tokens_per_sec": length / seconds,
            "peak_memory_gib": peak, "memory_before_step_gib": rss_before if not cuda else None,
            "parameters": lm.model.num_parameters()}


def run(args: argparse.Namespace) -> dict:
    """Benchmark every model at every length, each in its own process; returns the JSON payload."""
    results = []
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for length in args.lengths:
            for model in args.models:
                r = pool.submit(bench_one, model, length, args.repeats, args.warmup, args.device, args.precision,
                                args.threads).result()
                print(f"  {model:18s} L={length:6d}  {r['seconds_per_step']:8.3f} s/step", flush=True)
                results.append(r)
    for r in results:
        ref = next((x for x in results if x["model"] == "transformer" and x["length"] == r["length"]), None)
        r["speedup_vs_transformer"] = r["tokens_per_sec"] / ref["tokens_per_sec"] if ref else None
    return {"device": args.device, "precision": args.precision, "threads": args.threads, "batch_size": 1,
            "repeats": args.repeats, "warmup": args.warmup, "model": PAPER, "results": results}


def format_table(payload: dict) -> str:
    """Markdown table of the results (one row per model and length)."""
    lines = ["| model | L | s/step | tokens/s | × Transformer | peak GiB |", "|---|---|---|---|---|---|"]
    for r in payload["results"]:
        ratio = f"{r['speedup_vs_transformer']:.2f}" if r["speedup_vs_transformer"] else "-"
        lines.append(f"| {r['model']} | {r['length']} | {r['seconds_per_step']:.3f} | {r['tokens_per_sec']:.0f} | "
                     f"{ratio} | {r['peak_memory_gib']:.2f} |")
    return "\n".join(lines)


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (0 on a slow CPU at 8192)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = create_parser().parse_args(argv)
    payload = run(args)
    print(format_table(payload))
    if args.out is not None:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
