"""Screen attention-transfer recipes on one projection draw (issue 31): human heavy chains held out, as transfer_study.

    OMP_NUM_THREADS=1 python studies/fig5_iglm/transfer_recipes.py /work/runs/fig5_real runs/recipes NAME \\
        '{"features": "oprf-rescaled", "augment": 3}' [--draw 0] [--model IgLM-S] [--features 256]

The JSON holds keyword arguments of ``model.transfer.transfer_attention`` (lr, warmup, loss, inputs, layer_shares,
train, decay) plus ``steps`` (default: pp-convert's), ``features`` (the start), ``augment`` / ``mutate`` (mutated
copies of each chain and their rate), ``max_tokens`` (batch size) and ``calibration`` (chains). Prints one line
(accuracy, perplexity, KL to exact, CPU-s, per-layer error on the calibration and held-out chains) and caches it in
``OUT/<model>_<NAME>_m<m>_d<draw>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transfer_study import MODEL_SIZES, calibration_records, eval_batches, layer_errors, load_exact, score, test_records

from proteinperformer.model.transfer import (
    calibration_batches,
    default_steps,
    mutated_copies,
    transfer_attention,
    transfer_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="fig5_real.py's OUTDIR (its data/ split)")
    parser.add_argument("out", type=Path)
    parser.add_argument("name")
    parser.add_argument("recipe", help="JSON keyword arguments (see above)")
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--model", default="IgLM-S", choices=tuple(MODEL_SIZES))
    parser.add_argument("--features", type=int, default=256)
    args = parser.parse_args()
    path = args.out / f"{args.model}_{args.name}_m{args.features}_d{args.draw}.json"
    if path.exists():
        print(path.read_text())
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kw, m = json.loads(args.recipe), args.features
    exact = load_exact(args.model)
    records = [r for r in test_records(args.data, 60) if r[1] == "heavy" and "[HUMAN]" in r[2]]
    batches = eval_batches(exact, records)
    with torch.no_grad():
        exact_logp = [F.log_softmax(exact(r["input_ids"], r["padding_mask"])["logits"].double(), -1)
                      for r, _ in batches]
    steps = kw.pop("steps", None) or default_steps(*MODEL_SIZES[args.model], m)
    calib = mutated_copies(calibration_records(args.data, kw.pop("calibration", 15)), kw.pop("augment", 0),
                           kw.pop("mutate", 0.1), seed=args.draw)
    calib = calibration_batches(exact.alphabet, calib, cls=False, max_tokens=kw.pop("max_tokens", 512))
    t0 = time.process_time()
    model = transfer_model(exact, m, "softmax", seed=args.draw, features=kw.pop("features", "favor+"))
    layers = transfer_attention(exact, model, calib, steps=steps, log=None, **kw)
    cpu = time.process_time() - t0
    s = score(model, exact_logp, batches, records)["human_heavy"]
    e = score(exact, exact_logp, batches, records)["human_heavy"]
    held = layer_errors(exact, model, batches[:1])
    info = dict(name=args.name, recipe=args.recipe, draw=args.draw, model=args.model, m=m, steps=steps, acc=s["acc"],
                ppl=s["ppl"], kl=s["kl"], exact_acc=e["acc"], exact_ppl=e["ppl"], cpu=cpu,
                calib_err=[(r.error_before, r.error_after) for r in layers], layer_error=held)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"{args.model} {args.name} d{args.draw} m{m}: {100 * s['acc']:.2f}% ({100 * (s['acc'] - e['acc']):+.2f}) "
          f"ppl {s['ppl']:.3f} (x{s['ppl'] / e['ppl']:.3f}) KL {s['kl']:.4f} cpu {cpu:.0f}s calib "
          f"{[round(r.error_after, 3) for r in layers]} held {[round(x, 3) for x in held]}", flush=True)


if __name__ == "__main__":
    main()
