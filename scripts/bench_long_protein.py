"""Long proteins in one pass: time and peak memory of an ESM-2-8M-architecture model with FAVOR+ vs exact attention.

The model is ESM-2 8M's architecture (6 layers, width 320, 20 heads of 16, rotary positions, ESM alphabet),
randomly initialised (cost does not depend on the weights), as ``pp-convert --attention favor`` makes it from
``esm2_t6_8M_UR50D.pt``. FAVOR+ runs through ``embed()`` (per-residue final-layer states, one forward pass, no
windows); exact attention runs the same forward directly (``embed()`` caps it at ESM-2's 1,022 residues):
torch's CPU SDPA uses a blocked (flash) kernel for an unpadded sequence, so its memory stays linear too, and
its time grows as L². "fair-esm" is the original ``esm.ESM2`` forward (it materialises every layer's
[heads, L, L] attention weights), the memory a user of ESM's own code pays.
Each measurement is a fresh subprocess, so its peak RSS is its own: "peak" is the process's maximum resident
memory, "added" that minus the memory before the forward pass (model, Python and torch already loaded).

    OMP_NUM_THREADS=1 python scripts/bench_long_protein.py --lengths 1000 4000 16000 35000 \\
        --exact-lengths 1000 4000 16000 --esm-lengths 1000 2000 4000      # -> results/bench_long_protein.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_gib() -> float:
    """Current resident memory of this process in GiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def one(attention: str, length: int, num_features: int, threads: int) -> dict:
    import torch

    from proteinperformer.checkpoints.esm import esm2_config
    from proteinperformer.inference.embed import embed
    from proteinperformer.model import PerformerLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = "exact" if attention == "fair-esm" else attention
    model = PerformerLM(esm2_config(6, 320, 20, attention=ours, num_features=num_features)).eval()
    g = torch.Generator().manual_seed(1)
    seq = "".join("ACDEFGHIKLMNPQRSTVWY"[i] for i in torch.randint(20, (length,), generator=g).tolist())
    base = rss_gib()
    start = time.perf_counter()
    if attention == "favor":
        out = embed(model, [("long", seq)], layers=[-1], include=("per_tok",))["long"]["per_tok"][-1]
    elif attention == "fair-esm":
        import esm

        alphabet = esm.Alphabet.from_architecture("ESM-1b")
        ref = esm.ESM2(6, 320, 20, alphabet=alphabet, token_dropout=True).eval()
        tokens = alphabet.get_batch_converter()([("long", seq)])[2]
        base = rss_gib()
        start = time.perf_counter()
        with torch.inference_mode():
            out = ref(tokens, repr_layers=[6])["representations"][6][0, 1:-1]
    else:
        with torch.inference_mode():
            tokens = model.alphabet.get_batch_converter()([("long", seq)])[2]
            out = model(tokens, repr_layers=[6])["representations"][6][0, 1:-1]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    assert out.shape == (length, 320) and bool(torch.isfinite(out).all())
    return {"attention": attention, "residues": length, "seconds": round(seconds, 2), "peak_gib": round(peak, 3),
            "added_gib": round(peak - base, 3), "num_features": num_features if attention == "favor" else None,
            "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 16000, 35000])
    parser.add_argument("--exact-lengths", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--esm-lengths", type=int, nargs="*", default=[1000, 4000, 8000],
                        help="lengths for fair-esm's own ESM2 (needs the esm extra); give none to skip")
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_long_protein.json")
    parser.add_argument("--one", nargs=2, metavar=("ATTENTION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.num_features, args.threads)))
        return
    rows = []
    runs = ([("favor", n) for n in args.lengths] + [("exact", n) for n in args.exact_lengths]
            + [("fair-esm", n) for n in args.esm_lengths])
    for attention, n in runs:
        cmd = [sys.executable, __file__, "--one", attention, str(n), "--num-features", str(args.num_features),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            rows.append({"attention": attention, "residues": n, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{'attention':<10} {'residues':>9} {'seconds':>8} {'peak GiB':>9} {'added GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention']:<10} {r['residues']:>9,}  failed: {r['error']}")
        else:
            print(f"{r['attention']:<10} {r['residues']:>9,} {r['seconds']:>8.1f} {r['peak_gib']:>9.2f} "
                  f"{r['added_gib']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps({"model": "ESM-2 8M architecture (6 x 320, 20 heads), random weights",
                               "rows": rows}, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
