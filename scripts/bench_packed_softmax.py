"""Packed Performer-softmax training steps: the fused per-run path against one unpacked call per protein.

    python scripts/bench_packed_softmax.py --threads 1      # budgets 4k (12 batches) and 16k (3 batches)

The same packed batches (``bench_packing.py``'s, from one pool of 1,600 bundled proteins, crop 1,024) train a
Performer-softmax MLM (``bench_packing.NETWORK``) with the packed noncausal path of ``attention/noncausal.py``
(``new``: ``_SoftmaxNoncausalPacked`` on runs of documents) and with its predecessor (``per-protein``: the unpacked
``_SoftmaxNoncausal`` once per protein, through ``documents.per_document``), interleaved, each also against the
same streams taken as one document (``one-document``: no per-protein work at all, the floor; wrong attention, same
shapes), and with length-bucketed batches of the same pool holding as many tokens (``bucketed``: the unpacked
Function on B·H rows, as ``bench_packing.py``'s bucketed rows), compared per computed token. The learning rate is
0, so every repeat trains the same step. Step time: the process's CPU time, minimum over ``--repeats``. Writes
``results/bench_packed_softmax.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import proteinperformer.attention.noncausal as noncausal
from proteinperformer.attention.documents import per_document
from proteinperformer.files import write_json_atomic
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_packing as bp  # noqa: E402

PACKED = noncausal._SoftmaxNoncausalPacked.apply


def per_protein(q, k, v, Pa, mask, sizes, eps):
    """The path before: one unpacked fused call per protein."""
    cu = torch.tensor([0, *np.cumsum(sizes)])
    return per_document(lambda qd, kd, vd, md: noncausal._SoftmaxNoncausal.apply(qd, kd, vd, Pa, md, eps), cu,
                        q, k, v, mask, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tokens", type=int, default=49152, help="tokens of batches per budget (whole batches)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_packed_softmax.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    alphabet = Alphabet()
    seqs = bp.bundled(alphabet)
    pool = seqs.subset(np.random.default_rng(1).choice(len(seqs), bp.POOL, replace=False))
    rows = []
    print(f"{'budget':>6} {'batches':>7} {'per-protein s':>13} {'new s':>7} {'one-doc s':>9} {'new/per-protein':>15} "
          f"{'new/one-doc':>11} {'us/token new/bucketed':>21}")
    for budget in args.budgets:
        n = max(1, args.tokens // budget)
        batches = [b for _, b in zip(range(n), bp.batches("packed", pool, alphabet, "mlm", budget, 1024),
                                     strict=False)]
        tokens = {"packed": sum(b["input_ids"].numel() for b in batches), "bucketed": 0}
        bucketed = []
        for b in bp.batches("bucketed", pool, alphabet, "mlm", budget, 1024):  # as many tokens, same pool
            if tokens["bucketed"] >= tokens["packed"]:
                break
            bucketed.append(b)
            tokens["bucketed"] += b["input_ids"].numel()
        torch.manual_seed(0)
        cfg = ModelConfig(**bp.NETWORK, **bp.MODELS["performer_softmax"], max_positions=1 << 17)
        model = PerformerLM(cfg).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        times = {"per-protein": [], "new": [], "one-document": [], "bucketed": []}
        for _ in range(args.repeats):
            for name in times:
                noncausal._SoftmaxNoncausalPacked.apply = per_protein if name == "per-protein" else PACKED
                total = 0.0
                for batch in bucketed if name == "bucketed" else batches:
                    if name == "one-document":
                        batch = {k: v for k, v in batch.items() if k != "cu_seqlens"}
                    start = time.process_time()
                    bp.train_step(model, optimizer, batch, "cpu")
                    total += time.process_time() - start
                times[name].append(total)
        noncausal._SoftmaxNoncausalPacked.apply = PACKED
        best = {k: min(v) for k, v in times.items()}
        per_token = {k: v / tokens["bucketed" if k == "bucketed" else "packed"] for k, v in best.items()}
        row = {"budget": budget, "batches": n, "tokens": tokens, "seconds": best,
               "new_vs_per_protein": best["new"] / best["per-protein"],
               "new_vs_one_document": best["new"] / best["one-document"],
               "token_cost_new_vs_bucketed": per_token["new"] / per_token["bucketed"]}
        rows.append(row)
        print(f"{budget:>6} {n:>7} {best['per-protein']:>13.3f} {best['new']:>7.3f} {best['one-document']:>9.3f} "
              f"{row['new_vs_per_protein']:>15.3f} {row['new_vs_one_document']:>11.3f} "
              f"{row['token_cost_new_vs_bucketed']:>21.3f}", flush=True)
    write_json_atomic(args.out, {"config": {"threads": args.threads, "repeats": args.repeats, "clock": "process CPU",
                                            "network": bp.NETWORK, "torch": torch.__version__}, "rows": rows},
                      indent=1)
    print(args.out)


if __name__ == "__main__":
    main()
