"""The cost of the sliding-window hybrid (attention/window.py): a causal training step with window W vs plain FAVOR.

    OMP_NUM_THREADS=1 python scripts/bench_window.py                    # 2k, 8k, 16k tokens; W = 16, 64
    OMP_NUM_THREADS=1 python scripts/bench_window.py --lengths 2048 --repeats 3

One causal PerformerLM (softmax kernel, FAVOR+ features, m = 256; width 256, 4 heads, 2 layers, rotary positions:
no length cap), one sequence of L tokens, one training step (forward, cross-entropy, backward, AdamW). The windows
W = 0 (plain FAVOR: the fused causal kernel), and each ``--windows`` are set on the same model and timed
interleaved (0, 16, 64, 0, 16, 64, ...), ``--repeats`` times each after one warm-up step; the table gives the
minimum process CPU time per W and its ratio to W = 0 in the same run (one thread: the machine may be shared, so
compare ratios, not seconds). Writes ``results/bench_window.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from proteinperformer.files import write_json_atomic
from proteinperformer.model import ModelConfig, PerformerLM

ROOT = Path(__file__).resolve().parents[1]


def step(model: PerformerLM, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """CPU seconds of one training step on ``tokens`` (1, L)."""
    t0 = time.process_time()
    logits = model(tokens)["logits"]
    loss = F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_window.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, depth=2, heads=4, ff_dim=1024, positions="rotary", attention="favor",
                      kernel="softmax", num_features=256, causal=True)
    model = PerformerLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    windows = [0, *args.windows]
    rows = []
    print(f"causal training step, {cfg.depth} layers x width {cfg.dim}, {cfg.heads} heads, m = {cfg.num_features}, "
          f"{args.threads} thread(s); min CPU-s of {args.repeats} interleaved repeats")
    print("| tokens | " + " | ".join(f"W={w} CPU-s" for w in windows) + " | "
          + " | ".join(f"W={w} / W=0" for w in args.windows) + " |")
    print("|---:|" + "---:|" * (2 * len(windows) - 1))
    for L in args.lengths:
        tokens = torch.randint(4, 24, (1, L))
        times: dict[int, list[float]] = {w: [] for w in windows}
        for rep in range(args.repeats + 1):
            for w in windows:
                for block in model.layers:
                    block.attn.window = w
                t = step(model, opt, tokens)
                if rep:  # the first round warms up
                    times[w].append(t)
        best = {w: min(ts) for w, ts in times.items()}
        ratios = {w: best[w] / best[0] for w in args.windows}
        rows.append({"tokens": L, "cpu_seconds": times, "min_cpu_seconds": best, "ratio_to_w0": ratios})
        print(f"| {L} | " + " | ".join(f"{best[w]:.2f}" for w in windows) + " | "
              + " | ".join(f"{ratios[w]:.2f}" for w in args.windows) + " |", flush=True)
    write_json_atomic(args.out, {"config": cfg.to_dict(), "threads": args.threads, "repeats": args.repeats,
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
