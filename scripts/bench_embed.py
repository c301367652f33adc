"""Embedding benchmark: pp-embed's memory against the number of proteins, and its throughput against fair-esm's own
extraction loop, every configuration a separate process measured in the same run (peak RSS from getrusage).

    python scripts/bench_embed.py                                            # both parts (~20 min on 2 cores)
    python scripts/bench_embed.py --parts memory --sizes 2000 20000 --out /tmp/bench_embed.json   # a quick look

Writes ``results/bench_embed.json`` by default, one top-level key per part (``memory``, ``throughput``), each with
the host and start time of the run that measured it: a run replaces the parts it ran and keeps the others.

1. memory: ``pp-embed --format h5 --include mean`` of N synthetic proteins (50-150 residues, a tiny 1-layer
   exact-attention model) for each N of ``--sizes`` (default 50,000 / 100,000 / 200,000): wall time, peak RSS,
   and the slope of peak RSS against N (least squares) in bytes per protein.
2. throughput: ``--n-real`` real UniProt proteins (≤ 1,022 residues, sampled from data/uniprot_sample20k.fasta.gz)
   through a randomly initialised ESM-2 8M (6 layers, 320 wide, 20 heads; built with fair-esm, saved as a fair-esm
   ``.pt`` file) by ``pp-embed`` (exact attention fp32, ``--precision bf16``, ``--attention favor``) and by fair-esm's
   extract.py loop (``esm.pretrained`` model, ``FastaBatchedDataset.get_batch_indices(toks_per_batch)``,
   ``BatchConverter``, a ``.pt`` per protein), all with ``--threads`` threads and the same ``--toks-per-batch``:
   residues/s of the whole process (start-up included), peak RSS, and the largest difference of the final-layer
   mean embeddings from fair-esm's.

Prints a table and writes JSON. The machine may be shared: compare the ratios, measured in one run; on a loaded
machine the CPU-time rates (residues per CPU-second of the whole process: user + system time, from getrusage)
vary far less than the wall-clock ones, and both are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = '''
import sys, time, torch, esm
from pathlib import Path
from esm.data import FastaBatchedDataset
path, fasta, outdir, toks_per_batch, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
regression = torch.load(path.replace(".pt", "-contact-regression.pt"), weights_only=False)
model, alphabet = esm.pretrained.load_model_and_alphabet_core(Path(path).stem, torch.load(path, weights_only=False),
                                                               regression)
model.eval()
dataset = FastaBatchedDataset.from_file(fasta)
batches = dataset.get_batch_indices(int(toks_per_batch), extra_toks_per_seq=1)
loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022), batch_sampler=batches)
out = Path(outdir); out.mkdir(parents=True, exist_ok=True)
layer = model.num_layers
with torch.no_grad():
    for labels, strs, toks in loader:
        reps = model(toks, repr_layers=[layer], return_contacts=False)["representations"]
        reps = {k: t.to(device="cpu") for k, t in reps.items()}
        for i, label in enumerate(labels):
            n = min(1022, len(strs[i]))
            torch.save({"label": label, "mean_representations": {k: t[i, 1 : n + 1].mean(0).clone()
                                                                 for k, t in reps.items()}}, out / f"{label}.pt")
'''
MEASURE = '''
import resource, subprocess, sys, time, json
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "cpu_s": use.ru_utime + use.ru_stime,
                  "peak_rss_bytes": use.ru_maxrss * 1024, "stderr": proc.stderr[-2000:]}))
'''


def measured(cmd: list[str], threads: int) -> dict:
    """Run ``cmd`` in a fresh process (through a wrapper that reports only its peak RSS) with ``threads`` threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['stderr']}")
    return res


def pp_embed(checkpoint: str, fasta: str, out: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "proteinperformer.cli.embed", checkpoint, fasta, "--out", out, *args]


# ---- 1. memory against the number of proteins ---------------------------------------------------
def synthetic_fasta(path: Path, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    residues = 0
    with open(path, "w") as f:
        for i in range(n):
            length = int(rng.integers(50, 151))
            residues += length
            f.write(f">syn{i}\n{''.join(rng.choice(letters, length))}\n")
    return residues


def memory_part(work: Path, sizes: list[int], threads: int, toks_per_batch: int, block: int) -> dict:
    from proteinperformer.checkpoints import save_checkpoint
    from proteinperformer.model import ModelConfig, PerformerLM

    torch.manual_seed(0)
    tiny = PerformerLM(ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, positions="sinusoidal", attention="exact"))
    ckpt = save_checkpoint(tiny, work / "tiny.ckpt", "bench_embed")
    rows = []
    for n in sizes:
        fasta = work / f"syn{n}.fasta"
        residues = synthetic_fasta(fasta, n)
        out = work / f"syn{n}"
        res = measured(pp_embed(str(ckpt), str(fasta), str(out), "--format", "h5", "--include", "mean",
                                "--toks-per-batch", str(toks_per_batch), "--device", "cpu", "--block-size",
                                str(block)), threads)
        size = sum(p.stat().st_size for p in out.rglob("*.h5"))
        rows.append({"proteins": n, "residues": residues, "wall_s": round(res["wall_s"], 1),
                     "cpu_s": round(res["cpu_s"], 1),
                     "peak_rss_mib": round(res["peak_rss_bytes"] / 2**20, 1), "h5_bytes": size,
                     "residues_per_s": round(residues / res["wall_s"])})
        print(f"memory: {n:>9,} proteins {res['wall_s']:7.1f} s  peak RSS {res['peak_rss_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    x = np.array([r["proteins"] for r in rows], dtype=np.float64)
    y = np.array([r["peak_rss_mib"] * 2**20 for r in rows])
    slope = float(np.polyfit(x, y, 1)[0]) if len(rows) > 1 else float("nan")
    return {"model": "PerformerLM dim 16, depth 1, exact attention, sinusoidal", "block_size": block, "rows": rows,
            "slope_bytes_per_protein": round(slope, 2)}


# ---- 2. throughput against fair-esm --------------------------------------------------------------
def write_esm2_8m(path: Path, seed: int = 0) -> Path:
    """A randomly initialised ESM-2 8M built with fair-esm and saved as fair-esm saves its files."""
    import esm

    torch.manual_seed(seed)
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    model = esm.ESM2(num_layers=6, embed_dim=320, attention_heads=20, alphabet=alphabet, token_dropout=True).eval()
    state = model.state_dict()
    prefixed = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
                for k, v in state.items() if not k.startswith("contact_head")}
    cfg = argparse.Namespace(encoder_layers=6, encoder_embed_dim=320, encoder_attention_heads=20, token_dropout=True,
                             encoder_ffn_embed_dim=1280)
    torch.save({"model": prefixed, "cfg": {"model": cfg}}, path)
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("contact_head")}},
               path.with_name(path.stem + "-contact-regression.pt"))
    return path


def real_fasta(path: Path, n: int, seed: int = 0) -> tuple[list[tuple[str, str]], int]:
    from proteinperformer.data.fasta import read_fasta

    records = [(r.id, r.sequence.removesuffix("*")) for r in read_fasta(ROOT / "data/uniprot_sample20k.fasta.gz")]
    records = [r for r in records if len(r[1]) <= 1022]
    records = random.Random(seed).sample(records, n)
    path.write_text("".join(f">{label}\n{seq}\n" for label, seq in records))
    return records, sum(len(s) for _, s in records)


def throughput_part(work: Path, n: int, threads: int, toks_per_batch: int) -> dict:
    from proteinperformer.inference.embed_files import read_embeddings

    esm_file = write_esm2_8m(work / "esm2_t6_8M_UR50D.pt")
    records, residues = real_fasta(work / "real.fasta", n)
    runs = {}
    configs = {
        "fair-esm extract loop": [sys.executable, "-c", PEER, str(esm_file), str(work / "real.fasta"),
                                  str(work / "esm_out"), str(toks_per_batch), str(threads)],
        "pp-embed exact fp32": pp_embed(str(esm_file), str(work / "real.fasta"), str(work / "pp_exact"), "--format",
                                        "h5", "--label", "header", "--toks-per-batch", str(toks_per_batch),
                                        "--device", "cpu"),
        "pp-embed exact --precision bf16": pp_embed(str(esm_file), str(work / "real.fasta"), str(work / "pp_bf16"),
                                                    "--format", "h5", "--label", "header", "--toks-per-batch",
                                                    str(toks_per_batch), "--device", "cpu", "--precision", "bf16"),
        "pp-embed --attention favor": pp_embed(str(esm_file), str(work / "real.fasta"), str(work / "pp_favor"),
                                               "--format", "h5", "--label", "header", "--toks-per-batch",
                                               str(toks_per_batch), "--device", "cpu", "--attention", "favor"),
    }
    for name, cmd in configs.items():
        res = measured(cmd, threads)
        runs[name] = {"wall_s": round(res["wall_s"], 1), "residues_per_s": round(residues / res["wall_s"]),
                      "cpu_s": round(res["cpu_s"], 1), "residues_per_cpu_s": round(residues / res["cpu_s"]),
                      "peak_rss_mib": round(res["peak_rss_bytes"] / 2**20, 1)}
        print(f"throughput: {name:34s} {res['wall_s']:7.1f} s  {residues / res['wall_s']:8.0f} residues/s  "
              f"{residues / res['cpu_s']:8.0f} residues/CPU-s  peak RSS "
              f"{res['peak_rss_bytes'] / 2**20:7.1f} MiB", flush=True)
    ref = {label: torch.load(work / "esm_out" / f"{label}.pt", weights_only=True)["mean_representations"][6]
           for label, _ in records}
    for name, folder in (("pp-embed exact fp32", "pp_exact"), ("pp-embed exact --precision bf16", "pp_bf16"),
                         ("pp-embed --attention favor", "pp_favor")):
        got = read_embeddings(work / folder, "h5")
        assert sorted(got) == sorted(ref), f"{name}: labels differ from fair-esm's"
        diff = max(float((got[k]["mean_representations"][6] - ref[k]).abs().max()) for k in ref)
        runs[name]["max_abs_diff_vs_fair_esm"] = diff
    peer = runs["fair-esm extract loop"]
    for r in runs.values():
        r["speed_vs_fair_esm"] = round(r["residues_per_s"] / peer["residues_per_s"], 2)
        r["cpu_speed_vs_fair_esm"] = round(r["residues_per_cpu_s"] / peer["residues_per_cpu_s"], 2)
    return {"proteins": n, "residues": residues, "model": "ESM-2 8M architecture, random init (fair-esm file)",
            "toks_per_batch": toks_per_batch, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=("memory", "throughput"), default=["memory", "throughput"])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    p.add_argument("--block-size", type=int, default=100_000, help="pp-embed --block-size in the memory part")
    p.add_argument("--n-real", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--toks-per-batch", type=int, default=4096)
    p.add_argument("--out", type=Path, default=ROOT / "results/bench_embed.json")
    args = p.parse_args()
    host = {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_at_start": os.getloadavg()}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" in args.parts:
            result["throughput"] = throughput_part(Path(tmp), args.n_real, args.threads, args.toks_per_batch)
        if "memory" in args.parts:
            result["memory"] = memory_part(Path(tmp), args.sizes, args.threads, args.toks_per_batch,
                                           args.block_size)
    host["load_avg_at_end"] = os.getloadavg()
    from proteinperformer.files import write_json_atomic

    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    write_json_atomic(args.out, kept | {part: {"host": host, "started": started, **r} for part, r in result.items()})
    if "memory" in result:
        m = result["memory"]
        print("\n| proteins | wall s | CPU s | peak RSS MiB | h5 bytes |\n|---|---|---|---|---|")
        for r in m["rows"]:
            print(f"| {r['proteins']:,} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mib']} | {r['h5_bytes']:,} |")
        print(f"\npeak-memory slope: {m['slope_bytes_per_protein']} bytes per protein "
              f"(--block-size {m['block_size']:,})")
    if "throughput" in result:
        t = result["throughput"]
        print(f"\n{t['proteins']:,} proteins, {t['residues']:,} residues, {args.threads} threads\n")
        print("| run | residues/s (wall) | × fair-esm | residues/CPU-s | × fair-esm | peak RSS MiB | max abs diff vs "
              "fair-esm |\n|---|---|---|---|---|---|---|")
        for name, r in t["runs"].items():
            diff = r.get("max_abs_diff_vs_fair_esm")
            print(f"| {name} | {r['residues_per_s']:,} | {r['speed_vs_fair_esm']} | {r['residues_per_cpu_s']:,} | "
                  f"{r['cpu_speed_vs_fair_esm']} | {r['peak_rss_mib']} | {'-' if diff is None else f'{diff:.2e}'} |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
