"""FAVOR+ against calibrated FAVOR++ (OPRF, OPRF with rescaling) on IgLM, no training: a quick check of issue 31.

    nice -n 10 python studies/fig5_iglm/fig5_real.py runs/fig5_real --stages data     # held-out split (25 s)
    OMP_NUM_THREADS=1 nice -n 10 python studies/fig5_iglm/features_check.py runs/fig5_real --model IgLM-S

Scores next-residue accuracy and perplexity (``fig5_real.per_sequence``: IgLM framing, residues and [SEP]) on the
first ``--eval`` held-out human heavy chains, for exact attention and, per projection draw, FAVOR+ and FAVOR++ with
``--num-features`` features. FAVOR++ is calibrated the way ``pp-convert ... --features F --calibrate FASTA`` does
(:func:`proteinperformer.evaluation.conversion.calibrate_on_fasta`) on ``--calibration`` human heavy chains of the
training split (seed 0), so the held-out chains never enter the statistics. Prints one line per model and writes
OUTDIR/features_check_<model>_m<m>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fig5_real import encode, iglm_dir, per_sequence, read_records, summarise  # noqa: E402

import proteinperformer.evaluation.conversion as conversion  # noqa: E402
from proteinperformer.attention.oprf import FEATURES  # noqa: E402
from proteinperformer.checkpoints import load_model  # noqa: E402
from proteinperformer.evaluation.conversion import attention_errors  # noqa: E402
from proteinperformer.model import convert_attention  # noqa: E402


def human_heavy(fasta: Path) -> list[tuple[str, str, str]]:
    return [r for r in read_records(fasta) if r[1] == "heavy" and "[HUMAN]" in r[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="a fig5_real.py output folder with data/{train,test}.fasta")
    parser.add_argument("--model", default="IgLM-S", choices=("IgLM", "IgLM-S"))
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--eval", type=int, default=60, help="held-out human heavy chains scored")
    parser.add_argument("--calibration", type=int, default=15, help="training human heavy chains calibrated on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = human_heavy(args.outdir / "data" / "test.fasta")[: args.eval]
    train = human_heavy(args.outdir / "data" / "train.fasta")
    cal = random.Random(0).sample(train, args.calibration)
    cal_fasta = args.outdir / f"calibration_heavy_{args.calibration}.fasta"
    cal_fasta.write_text("".join(f">{i}\n{s}\n" for i, _, s in cal))
    exact = load_model(iglm_dir(args.model))
    tokens = encode(exact, test, cls=False)
    chains = ["heavy"] * len(test)
    probe = tokens[:16]
    rows = {"exact": summarise(per_sequence(exact, tokens, False), chains)["heavy"]}
    print(f"{args.model} exact: acc {rows['exact']['acc']:.4f} ppl {rows['exact']['ppl']:.3f}", flush=True)
    for draw in range(args.draws):
        for features in FEATURES:
            t0 = time.time()
            model = convert_attention(exact, "favor", args.num_features, "softmax", seed=draw, features=features)
            if features != "favor+":
                conversion.calibrate_on_fasta(model, cal_fasta, args.calibration)
            seconds = time.time() - t0
            score = summarise(per_sequence(model, tokens, False), chains)["heavy"]
            err = torch.zeros(exact.config.depth, 2, dtype=torch.float64)
            for t in probe:
                err += torch.tensor(attention_errors(exact, model, t[None]), dtype=torch.float64)
            score["layer_rel_error"] = (err[:, 0] / err[:, 1]).sqrt().tolist()
            score["calibration_seconds"] = seconds
            rows[f"{features} draw {draw}"] = score
            print(f"{args.model} {features} m={args.num_features} draw {draw}: acc {score['acc']:.4f} ppl "
                  f"{score['ppl']:.3f} layer error {[round(e, 3) for e in score['layer_rel_error']]} "
                  f"(conversion + calibration {seconds:.1f} s)", flush=True)
    for features in FEATURES:
        draws = [rows[f"{features} draw {d}"] for d in range(args.draws)]
        acc = [r["acc"] for r in draws]
        ppl = [r["ppl"] for r in draws]
        rows[f"{features} mean"] = {"acc": sum(acc) / len(acc), "ppl": sum(ppl) / len(ppl)}
        print(f"{args.model} {features} m={args.num_features} mean of {args.draws} draws: acc "
              f"{100 * sum(acc) / len(acc):.2f}% ppl {sum(ppl) / len(ppl):.3f}", flush=True)
    out = args.outdir / f"features_check_{args.model}_m{args.num_features}.json"
    out.write_text(json.dumps({"model": args.model, "num_features": args.num_features, "eval": len(test),
                               "calibration": args.calibration, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
