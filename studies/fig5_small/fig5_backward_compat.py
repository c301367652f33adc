"""Backward compatibility at small scale (Performer paper, Fig. 5): a trained Transformer becomes a Performer.

Trains an exact-attention Transformer with ``train.py`` on CPU, converts its checkpoint to FAVOR+ softmax
attention with ``pp-convert``, and records masked-residue validation accuracy right after the conversion and
after 100 / 300 / 1,000 fine-tuning steps (``train.py init_from=...``), beside the Transformer and a Performer
trained from scratch for the same total number of steps. Every run is a ``train.py`` run under OUTDIR; a stage
whose ``metrics.json`` exists is skipped, so the script resumes. Writes fig5.json and fig5.png into ``--results``
(default: this study's ``results/``).

    mkdir -p runs/fig5 && OMP_NUM_THREADS=1 nohup python studies/fig5_small/fig5_backward_compat.py runs/fig5 \
        > runs/fig5/log.txt &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # studies/fig5_small: results/ is written here
ROOT = HERE.parents[1]  # the repository: scripts/train.py, conf/, the runs' working directory
# small enough for a few minutes per run on 2 CPU cores
COMMON = [
    "data.max_len=128",
    "model.config.max_positions=128",
    "data.batch_size=16",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
    "callbacks.periodic_checkpoint.every_n_train_steps=500",
]
FINETUNE_STEPS = (100, 300, 1000)


def train(outdir: Path, name: str, steps: int, overrides: list[str]) -> dict:
    """One train.py run (skipped if OUTDIR/name/metrics.json exists); returns its metrics."""
    run = outdir / name
    if not (run / "metrics.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *COMMON, f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", f"output_dir={run}", *overrides]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((run / "metrics.json").read_text())


def evaluate(checkpoint: Path, outdir: Path) -> dict:
    """Validation accuracy/perplexity of a checkpoint without training (train.py with max_steps=0)."""
    path = outdir / "converted_eval.json"
    if not path.exists():
        from hydra import compose, initialize_config_dir

        from proteinperformer.training.train import evaluate_checkpoint

        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*COMMON, f"init_from={checkpoint}", f"output_dir={outdir}/_eval"])
        path.write_text(json.dumps(evaluate_checkpoint(cfg), indent=2) + "\n")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--base-steps", type=int, default=1000, help="Transformer steps before the conversion")
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--stages", choices=("all", "base", "finetune"), default="all",
                        help="base: only the runs that need no conversion; finetune: only the conversion and "
                        "fine-tuning runs (the two can run side by side); all: everything, then the table")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where fig5.json and fig5.png go")
    args = parser.parse_args()
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    total = args.base_steps + max(FINETUNE_STEPS)
    base = train(out, f"transformer_{args.base_steps}", args.base_steps, ["model=transformer"])
    if args.stages != "finetune":
        transformer = train(out, f"transformer_{total}", total, ["model=transformer"])
        performer = train(out, f"performer_{total}", total,
                          ["model=performer_softmax", f"model.config.num_features={args.num_features}"])
    if args.stages == "base":
        return
    converted = out / "converted_favor.ckpt"
    if not converted.exists():
        subprocess.run([sys.executable, "-m", "proteinperformer.cli.convert", base["last_checkpoint"], str(converted),
                        "--attention", "favor", "--kernel", "softmax", "--num-features", str(args.num_features)],
                       check=True, cwd=ROOT)
    at_once = evaluate(converted, out)
    finetuned = {n: train(out, f"finetune_{n}", n, [f"init_from={converted}", f"model.lr={args.finetune_lr}",
                                                   f"model.warmup_steps={max(n // 10, 1)}"])
                 for n in FINETUNE_STEPS}
    if args.stages == "finetune":
        return
    rows = [{"model": "Transformer (exact)", "steps": args.base_steps, "val_acc": base["val_acc"],
             "val_ppl": base["val_ppl"]},
            {"model": "Transformer (exact)", "steps": total, "val_acc": transformer["val_acc"],
             "val_ppl": transformer["val_ppl"]},
            {"model": "Performer from scratch", "steps": total, "val_acc": performer["val_acc"],
             "val_ppl": performer["val_ppl"]}]
    rows.append({"model": "Transformer -> FAVOR+ (no fine-tuning)", "steps": args.base_steps,
                 "val_acc": at_once["val_acc"], "val_ppl": at_once["val_ppl"]})
    for n, m in finetuned.items():
        rows.append({"model": f"Transformer -> FAVOR+ + {n} fine-tuning steps", "steps": args.base_steps + n,
                     "val_acc": m["val_acc"], "val_ppl": m["val_ppl"]})
    table = {"base_steps": args.base_steps, "num_features": args.num_features, "kernel": "softmax",
             "baseline_acc": base["baseline_acc"], "baseline_ppl": base["baseline_ppl"], "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    tmp = args.results / "fig5.json.tmp"
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, args.results / "fig5.json")
    plot(table, args.results / "fig5.png")
    for r in rows:
        print(f"{r['model']:<45} {r['steps']:>6} {100 * r['val_acc']:6.2f}% {r['val_ppl']:7.2f}")


def plot(table: dict, path: Path) -> None:
    """Accuracy against total training steps: the fine-tuning curve beside the two references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, b = table["rows"], table["base_steps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([b, b + max(FINETUNE_STEPS)], [rows[0]["val_acc"] * 100, rows[1]["val_acc"] * 100], "o-",
            label="Transformer (exact)")
    ax.plot([rows[2]["steps"]], [rows[2]["val_acc"] * 100], "s", label="Performer from scratch")
    ft = rows[3:]
    ax.plot([r["steps"] for r in ft], [r["val_acc"] * 100 for r in ft], "^-", label="Transformer → FAVOR+ fine-tuned")
    ax.axhline(table["baseline_acc"] * 100, color="grey", ls=":", label="unigram baseline")
    ax.set_xlabel("total training steps")
    ax.set_ylabel("masked-residue accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
