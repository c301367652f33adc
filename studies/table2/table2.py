"""Score the Table-2 sweep (conf/experiment/table2.yaml) in two columns: the same steps and the same wall-clock.

    OMP_NUM_THREADS=1 python scripts/train.py -m experiment=table2 task=mlm,clm \
        model=performer_relu,performer_softmax,transformer
    python studies/table2/table2.py runs/table2 --tasks mlm      # -> studies/table2/results/table2_mlm.{md,json}

Per task (runs/table2/<task>/<model>/), "same steps" is the checkpoint at the largest multiple of the
checkpoint interval that every model of that task reached within the budget; "same wall-clock" is the run's
best checkpoint by validation perplexity (the last validations are the best in every run so far). Both are
scored on the run's own validation batches (the same windows and masks for every model; MLM masks 15% of
residues, all by <mask>, whatever rate the runs trained with) and on the test split (``trainer.limit_test_batches``
of the experiment). Writes OUT.md (one table per task, with the unigram
baseline and the paper's numbers) and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from proteinperformer.data.datamodule import ProteinDataModule
from proteinperformer.training.train import score_checkpoint

# Choromanski et al. 2020, Table 2 (TrEMBL test, accuracy % / perplexity; 36M-parameter models, 1024 tokens)
PAPER = {
    ("mlm", "transformer"): (33.32, 9.22), ("mlm", "performer_relu"): (36.09, 8.36),
    ("mlm", "performer_softmax"): (33.00, 9.24),
    ("clm", "transformer"): (30.80, 9.37), ("clm", "performer_relu"): (31.58, 9.17),
}
PAPER_BASELINE = (9.92, 17.80)


def checkpoint_steps(run: Path) -> dict[int, Path]:
    """The periodic checkpoints of a run, by step (``step{N}.ckpt``)."""
    steps = {}
    for path in (run / "checkpoints").glob("step*.ckpt"):
        match = re.fullmatch(r"step(\d+)", path.stem)
        if match:
            steps[int(match.group(1))] = path
    return steps


def best_checkpoint(run: Path) -> Path:
    """The run's best checkpoint by validation perplexity (``step{N}-ppl{P}.ckpt``)."""
    best = sorted((run / "checkpoints").glob("step*-ppl*.ckpt"), key=lambda p: float(p.stem.split("-ppl")[1]))
    if not best:
        raise SystemExit(f"error: {run}/checkpoints: no step*-ppl*.ckpt (did the run validate at least once?)")
    return best[0]


def score(ckpt: Path, cfg, datamodule) -> dict[str, float]:
    """Validation and test accuracy / perplexity of one checkpoint (weights only, loaded without pickle)."""
    return score_checkpoint(ckpt, cfg.task_name, datamodule, cfg.trainer.limit_val_batches,
                            cfg.trainer.get("limit_test_batches") or 1.0)


def score_task(task_dir: Path, eval_mask_prob: float = 0.15) -> list[dict]:
    runs = sorted(p for p in task_dir.iterdir() if (p / "checkpoints").is_dir())
    if not runs:
        raise SystemExit(f"error: {task_dir}: no runs with checkpoints/ inside")
    steps = [checkpoint_steps(r) for r in runs]
    common = max(set.intersection(*(set(s) for s in steps)), default=None)
    if common is None:
        raise SystemExit(f"error: {task_dir}: the runs share no periodic checkpoint step")
    cfg = OmegaConf.load(runs[0] / ".hydra" / "config.yaml")
    cfg.data.num_workers = 0
    cfg.data.eval_mask_prob = eval_mask_prob  # MLM: the scored masks do not depend on the training mask rate
    # one data load for every model of the task; from_hparams reads the data config of any version of the code
    datamodule = ProteinDataModule.from_hparams(**OmegaConf.to_container(cfg.data, resolve=True))
    rows = []
    for run, run_steps in zip(runs, steps, strict=True):
        run_cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        best = best_checkpoint(run)
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        rows.append({"task": task_dir.name, "model": run.name, "common_step": common,
                     "final_step": metrics.get("global_step"), "best_checkpoint": best.name,
                     "parameters": metrics.get("parameters"),
                     "same_steps": score(run_steps[common], run_cfg, datamodule),
                     "same_time": score(best, run_cfg, datamodule)})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        base = task_rows[0]["same_time"]
        label = "MLM (BID)" if task == "mlm" else "CLM (UNI)"
        out += [f"**{label}**, same steps = step {task_rows[0]['common_step']:,}; same wall-clock = best "
                "checkpoint within the budget (accuracy % / perplexity)", "",
                "| model | steps in budget | valid, same steps | test, same steps | valid, same time | "
                "test, same time | paper (test) |", "|---|---|---|---|---|---|---|"]
        for r in task_rows:
            s, t = r["same_steps"], r["same_time"]
            paper = PAPER.get((task, r["model"]))
            out.append(f"| {r['model']} | {r['final_step'] or '–':,} | {100 * s['val_acc']:.2f} / {s['val_ppl']:.2f} | "
                       f"{100 * s['test_acc']:.2f} / {s['test_ppl']:.2f} | {100 * t['val_acc']:.2f} / "
                       f"{t['val_ppl']:.2f} | {100 * t['test_acc']:.2f} / {t['test_ppl']:.2f} | "
                       f"{f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else 'not reported'} |")
        out += [f"| unigram baseline | | {100 * base['baseline_acc']:.2f} / {base['baseline_ppl']:.2f} (valid) | | | | "
                f"{PAPER_BASELINE[0]:.2f} / {PAPER_BASELINE[1]:.2f} |", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the sweep directory (runs/table2: one subdirectory per task)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix: writes OUT.md and OUT.json (default: this study's results/table2_<tasks>)")
    parser.add_argument("--tasks", nargs="+", default=["mlm", "clm"], choices=["mlm", "clm"])
    parser.add_argument("--eval-mask-prob", type=float, default=0.15,
                        help="MLM: share of residues masked (all by <mask>) when scoring; 0.15 as the paper")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / f"table2_{'_'.join(args.tasks)}"
    task_dirs = [args.runs / t for t in args.tasks if (args.runs / t).is_dir()]
    if not task_dirs:
        raise SystemExit(f"error: {args.runs}: no mlm/ or clm/ subdirectory (run the sweep first)")
    rows = [row for task_dir in task_dirs for row in score_task(task_dir, args.eval_mask_prob)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(rows, indent=2) + "\n"), (".md", markdown(rows) + "\n")):
        tmp = args.out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out.with_suffix(suffix))
    print(markdown(rows))


if __name__ == "__main__":
    main()
