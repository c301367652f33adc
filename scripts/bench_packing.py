"""Packed vs padded training batches: real residues per second and peak memory of a training step.

    python scripts/bench_packing.py                 # the full grid (a few minutes on 2 threads)
    python scripts/bench_packing.py --quick         # a smaller grid (a few minutes on 1 thread)

For UniProt-length proteins (the bundled ``data/uniprot_sample20k.fasta.gz``, and the synthetic length generator of
``scripts/bench_scale.py``: log-normal, median ~300), crop ``--max-len`` (1,024), each token budget (4k, 16k, 64k
tokens per batch), each model (Performer-ReLU, Performer-softmax, the exact Transformer; a small network, same for
all) and task (MLM, CLM), one training step (forward, loss, backward, AdamW) is timed on batches built by the
package's own samplers and collators:

- ``packed`` (``data.packing=true``): one flat stream of up to budget tokens, whole proteins and windows of the
  longer ones, each attended alone (``cu_seqlens``); no pad token;
- ``bucketed`` (``data.toks_per_batch=budget``): rows of similar length, rows × longest ≤ budget;
- ``padded`` (plain random batches): budget // max_len rows, padded to the longest row.

All three train on the same proteins: each round draws a pool of ``--round-proteins`` (1,600: the data module's
bucketing pool at data.batch_size 16 and data.pool_batches 100) and runs one epoch over it in each batching (with
``--share`` < 1, the same random share of each epoch's batches; ``--quick``: 0.25), their steps interleaved
(packed, bucketed, padded, packed, ...) so that the machine's load changes hit all three alike; rounds repeat
until each has ``--steps`` steps and ``--min-seconds``. Step time is the process's CPU time (run with
``--threads 1`` on a shared machine; CUDA: wall time).

Reported per batching: real residues per second (residues, not pad, not <cls>/<eos>), the pad share (pad tokens
/ tokens), CPU µs per computed token, and the peak memory above the process's memory before a step, measured on
one more, untimed step on the batching's fullest batch of the run (most computed tokens; ``peak_tokens``) after the
timed ones (CPU: the peak resident set, reset through ``/proc/self/clear_refs``; CUDA:
``torch.cuda.max_memory_allocated``). A step's peak grows with its tokens, and a batching's batches differ in size
(a bucket's last batch may hold a quarter of the budget), so only the fullest batches compare.

Per row group: packed/padded and packed/bucketed (same run), the cost of a computed token packed/bucketed, and the
bound on packed/bucketed if a token cost the same in both, (1 − pad packed)/(1 − pad bucketed): bucketing by a
token budget leaves little padding, so packing can gain little more than that on a CPU. The machine may be shared:
compare ratios, not absolute rates. Writes ``results/bench_packing.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from proteinperformer.data.bucketing import LengthBucketBatchSampler, TokenCounts
from proteinperformer.data.collate import IGNORE_INDEX, CLMCollator, MLMCollator
from proteinperformer.data.datasets import EpochShuffleSampler, ProteinWindows, SingleSequenceDataset
from proteinperformer.data.packing import PackedBatchSampler, PackedCollator
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.files import write_json_atomic
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_scale import synth_lengths  # noqa: E402  (the synthetic generator of bench_scale.py)

MODELS = {
    "performer_relu": {"attention": "favor", "kernel": "relu"},
    "performer_softmax": {"attention": "favor", "kernel": "softmax"},
    "transformer": {"attention": "exact"},
}
NETWORK = {"dim": 64, "depth": 2, "heads": 4, "ff_dim": 256, "num_features": 64, "positions": "rotary"}
BATCHINGS = ("packed", "bucketed", "padded")
POOL = 16 * 100  # proteins per round: the data module's bucketing pool (data.batch_size 16 x data.pool_batches 100)


# ---- data -------------------------------------------------------------------------------------------------
def bundled(alphabet: Alphabet) -> TokenizedSequences:
    return TokenizedSequences.from_fasta(ROOT / "data" / "uniprot_sample20k.fasta.gz", alphabet)


def synthetic(alphabet: Alphabet, n: int = 20_000, seed: int = 0) -> TokenizedSequences:
    """``n`` proteins of bench_scale.py's lengths, random standard residues."""
    rng = np.random.default_rng(seed)
    lengths = synth_lengths(rng, n)
    standard = np.array(alphabet.standard_ids, dtype=np.uint8)
    tokens = standard[rng.integers(0, len(standard), int(lengths.sum()))]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedSequences(tokens, offsets, [f"SYN{i}" for i in range(n)])


def batches(kind: str, seqs: TokenizedSequences, alphabet: Alphabet, task: str, budget: int, max_len: int,
            seed: int = 0, share: float = 1.0):
    """One epoch over ``seqs`` of collated training batches of one batching ``kind``, as the data module builds
    them (bucketing: one pool holding all of ``seqs``, the data module's pool of the same proteins); ``share``:
    a random share of them (the same draw for every kind: an unbiased sample of the epoch's batches)."""
    collator = MLMCollator(alphabet) if task == "mlm" else CLMCollator(alphabet)
    n = len(seqs)
    if kind == "packed":
        dataset = ProteinWindows(seqs, alphabet, max_len, seed=seed)
        sampler = PackedBatchSampler(seqs.lengths, max_len, budget, batch_size=n, pool_batches=1, seed=seed)
        collator = PackedCollator(collator)
    else:
        dataset = SingleSequenceDataset(seqs, alphabet, max_len, seed=seed)
        if kind == "bucketed":
            sampler = LengthBucketBatchSampler(TokenCounts(seqs.lengths, max_len), n, 1, seed=seed,
                                               toks_per_batch=budget)
        else:
            rows = max(1, budget // max_len)
            order = [k for k in EpochShuffleSampler(n, seed=seed)]
            sampler = [order[i: i + rows] for i in range(0, n, rows)]
    keep = np.random.default_rng(seed).random(1 << 16) < share  # which batches of the epoch are trained
    for i, keys in enumerate(sampler):
        if keep[i % len(keep)]:
            yield collator([dataset[k] for k in keys])


def real_residues(batch: dict, alphabet: Alphabet) -> int:
    """Residues of a batch (not pad, not <cls>/<eos>): MLM's <mask> stands for one."""
    ids = batch["input_ids"]
    specials = (ids == alphabet.cls_idx) | (ids == alphabet.eos_idx) | batch["padding_mask"]
    return int((~specials).sum())


# ---- one training step ----------------------------------------------------------------------------------
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: str) -> float:
    """Start a peak-memory measurement; returns the memory in use now (MiB)."""
    _trim()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM, the peak resident set, to the current one
    return _rss_mib("VmRSS:")


def peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM:")


def train_step(model: PerformerLM, optimizer: torch.optim.Optimizer, batch: dict, device: str) -> None:
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(batch["input_ids"], batch["padding_mask"], cu_seqlens=batch.get("cu_seqlens"))["logits"]
    loss = F.cross_entropy(out.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clock(device: str) -> float:
    """CPU: this process's CPU time (other processes on a shared machine do not count; run with one thread);
    CUDA: wall time after a synchronize."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def measure(model_name: str, task: str, seqs, alphabet, budget: int, max_len: int, steps: int, min_seconds: float,
            device: str, round_proteins: int = POOL, share: float = 1.0, seed: int = 0) -> list[dict]:
    """One row per batching, all three trained on the same proteins: each round draws ``round_proteins``
    proteins and runs one epoch over them in each batching (the package's samplers on that set; ``share``: a
    random share of each epoch's batches), the steps of
    the three interleaved (packed, bucketed, padded, packed, ...) so that a change of the machine's load hits
    all alike; rounds repeat until every batching has ``steps`` timed steps and ``min_seconds`` of step time."""
    runs = {}
    for kind in BATCHINGS:
        torch.manual_seed(0)
        cfg = ModelConfig(**NETWORK, **MODELS[model_name], causal=task == "clm", max_positions=max_len)
        model = PerformerLM(cfg).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        warm = next(batches(kind, seqs.subset(np.arange(min(64, len(seqs)))), alphabet, task, budget, max_len))
        train_step(model, optimizer, warm, device)  # warm-up (AdamW state, allocator)
        runs[kind] = {"model": model, "optimizer": optimizer, "times": [], "fullest": warm, "residues": 0,
                      "tokens": 0, "pad": 0}
    rng = np.random.default_rng(seed)
    rounds = 0
    while rounds == 0 or any(len(r["times"]) < steps or sum(r["times"]) < min_seconds for r in runs.values()):
        subset = seqs.subset(rng.choice(len(seqs), min(round_proteins, len(seqs)), replace=False))
        streams = {kind: batches(kind, subset, alphabet, task, budget, max_len, seed + rounds, share) for kind in runs}
        rounds += 1
        while streams:
            for kind in list(streams):
                batch = next(streams[kind], None)
                if batch is None:
                    del streams[kind]
                    continue
                run = runs[kind]
                start = clock(device)
                train_step(run["model"], run["optimizer"], batch, device)
                run["times"].append(clock(device) - start)
                run["residues"] += real_residues(batch, alphabet)
                run["tokens"] += batch["input_ids"].numel()
                run["pad"] += int(batch["padding_mask"].sum())
                if batch["input_ids"].numel() > run["fullest"]["input_ids"].numel():
                    run["fullest"] = batch
    # Peak memory: one more step per batching, on its fullest batch, after the timed steps (resetting the peak,
    # gc and malloc_trim, costs the next step page faults, which would count in a timed step's CPU time).
    for run in runs.values():
        before = reset_peak(device)
        train_step(run["model"], run["optimizer"], run["fullest"], device)
        run["peak_mib"] = peak(device) - before
    rows = []
    for kind, run in runs.items():
        seconds, n = sum(run["times"]), len(run["times"])
        rows.append({"model": model_name, "task": task, "batching": kind, "budget": budget, "steps": n,
                     "rounds": rounds, "residues_per_s": run["residues"] / seconds,
                     "step_s_median": statistics.median(run["times"]), "residues_per_step": run["residues"] / n,
                     "pad_share": run["pad"] / run["tokens"], "us_per_token": 1e6 * seconds / run["tokens"],
                     "peak_mib": run["peak_mib"], "peak_tokens": run["fullest"]["input_ids"].numel()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=["mlm", "clm"], choices=["mlm", "clm"])
    parser.add_argument("--data", nargs="+", default=["uniprot", "synthetic"], choices=["uniprot", "synthetic"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row at least (after a warm-up step)")
    parser.add_argument("--min-seconds", type=float, default=1.5, help="timed seconds per row at least")
    parser.add_argument("--round-proteins", type=int, default=POOL,
                        help="proteins per round: every batching trains one epoch over the same drawn proteins")
    parser.add_argument("--share", type=float, default=1.0,
                        help="train this random share of each round's batches (--quick: 0.25)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="budgets 4k and 16k, the bundled data, MLM and CLM for the Performer-ReLU, MLM for the "
                             "others")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_packing.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    alphabet = Alphabet()
    if args.quick:
        args.budgets, args.data = [b for b in args.budgets if b <= 16384], ["uniprot"]
        args.share = min(args.share, 0.25)
    data = {name: (bundled if name == "uniprot" else synthetic)(alphabet) for name in args.data}
    grid = [(d, m, t, b) for d in data for m in args.models for t in args.tasks for b in args.budgets
            if not (args.quick and t == "clm" and m != "performer_relu")]
    rows, started = [], time.time()
    print(f"{'data':9} {'model':17} {'task':4} {'budget':>6} {'batching':8} {'steps':>5} {'res/s':>9} {'pad':>6} "
          f"{'us/token':>8} {'peak MiB':>8} {'at tokens':>9}")
    for d, m, t, b in grid:
        for row in measure(m, t, data[d], alphabet, b, args.max_len, args.steps, args.min_seconds, args.device,
                           args.round_proteins, args.share):
            row = {"data": d, **row}
            kind = row["batching"]
            rows.append(row)
            print(f"{d:9} {m:17} {t:4} {b:>6} {kind:8} {row['steps']:>5} {row['residues_per_s']:>9.0f} "
                  f"{row['pad_share']:>6.1%} {row['us_per_token']:>8.2f} {row['peak_mib']:>8.0f} "
                  f"{row['peak_tokens']:>9}", flush=True)
    ratios = []
    for d, m, t, b in grid:
        got = {r["batching"]: r for r in rows if (r["data"], r["model"], r["task"], r["budget"]) == (d, m, t, b)}
        rate = {k: r["residues_per_s"] for k, r in got.items()}
        # what packing could gain over bucketing if a computed token cost the same in both: its token share
        bound = (1 - got["packed"]["pad_share"]) / (1 - got["bucketed"]["pad_share"])
        ratios.append({"data": d, "model": m, "task": t, "budget": b, "packed_vs_padded": rate["packed"] /
                       rate["padded"], "packed_vs_bucketed": rate["packed"] / rate["bucketed"],
                       "bucketed_pad_share": got["bucketed"]["pad_share"],
                       "padded_pad_share": got["padded"]["pad_share"],
                       "token_cost_packed_vs_bucketed": got["packed"]["us_per_token"] / got["bucketed"]["us_per_token"],
                       "packed_vs_bucketed_if_equal_token_cost": bound})
    print(f"\n{'data':9} {'model':17} {'task':4} {'budget':>6} {'packed/padded':>13} {'packed/bucketed':>15} "
          f"{'pad padded':>10} {'pad bucketed':>12} {'us/token p/b':>12} {'p/b bound':>9}")
    for r in ratios:
        print(f"{r['data']:9} {r['model']:17} {r['task']:4} {r['budget']:>6} {r['packed_vs_padded']:>13.2f} "
              f"{r['packed_vs_bucketed']:>15.2f} {r['padded_pad_share']:>10.1%} {r['bucketed_pad_share']:>12.1%} "
              f"{r['token_cost_packed_vs_bucketed']:>12.2f} {r['packed_vs_bucketed_if_equal_token_cost']:>9.3f}")
    record = {"config": {"network": NETWORK, "max_len": args.max_len, "steps": args.steps,
                         "round_proteins": args.round_proteins, "share": args.share,
                         "clock": "process CPU time (cuda: wall)",
                         "min_seconds": args.min_seconds, "threads": args.threads,
                         "device": args.device, "quick": args.quick, "cpus": os.cpu_count(),
                         "torch": torch.__version__, "seconds": round(time.time() - started, 1),
                         "note": "shared machine: compare the same-run ratios, not absolute rates"},
              "rows": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record, indent=1)
    print(f"\n{args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
