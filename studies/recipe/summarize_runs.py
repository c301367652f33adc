"""Summarise a directory of training runs (a Hydra multirun sweep): a markdown table, JSON and a PNG of the
validation curves.

    python studies/recipe/summarize_runs.py runs/recipe --out studies/recipe/results/recipe --minutes 6.5 \
        --rescore-masks 0.15
    python studies/recipe/summarize_runs.py runs/table2/mlm --out /tmp/table2_mlm_curves --minutes 6.5

Each run directory holds what ``scripts/train.py`` writes: ``metrics.json`` (final validation of the best
checkpoint), ``csv/metrics.csv`` (the CSV logger: val/ppl, val/acc and perf/tokens_per_sec by step) and
``.hydra/overrides.yaml`` (the command-line overrides that name the run). Runs without metrics.json (still
running, or killed) are listed as such, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402


def run_name(run: Path) -> str:
    """The run's overrides minus ``experiment=...`` (the shared base), or its directory name."""
    overrides_file = run / ".hydra" / "overrides.yaml"
    if overrides_file.exists():
        overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or []
                     if not o.startswith(("experiment=", "hydra.", "trainer.max_time="))]
        if overrides:
            return " ".join(overrides)
    return run.name


def load_run(run: Path) -> dict:
    """One row of the table plus the validation curve (DataFrame of step, val/ppl, val/acc)."""
    log = pd.read_csv(run / "csv" / "metrics.csv") if (run / "csv" / "metrics.csv").exists() else pd.DataFrame()
    curve = log.dropna(subset=["val/ppl"])[["step", "val/ppl", "val/acc"]] if "val/ppl" in log else pd.DataFrame()
    curve = curve.drop_duplicates("step", keep="first")  # the final validate() repeats the best step
    rate = log["perf/tokens_per_sec"].dropna() if "perf/tokens_per_sec" in log else pd.Series(dtype=float)
    row = {"run": run_name(run), "dir": str(run), "finished": (run / "metrics.json").exists(),
           "tokens_per_sec": float(rate.median()) if len(rate) else None}
    if row["finished"]:
        metrics = json.loads((run / "metrics.json").read_text())
        row.update({k: metrics.get(k) for k in ("val_ppl", "val_acc", "baseline_ppl", "baseline_acc",
                                                  "global_step", "parameters", "test_ppl", "test_acc")})
    row["curve"] = curve
    return row


def rescore(rows: list[dict], mask_prob: float) -> None:
    """Replace val_ppl / val_acc of runs validated at another MLM masking rate by their best checkpoint's score
    on the masks at ``mask_prob`` (one data load, the first such run's data config); marks them ``rescored``."""
    from omegaconf import OmegaConf

    from proteinperformer.data.datamodule import ProteinDataModule  # a run's data config of any version
    from proteinperformer.training.train import score_checkpoint

    datamodule = None
    for r in rows:
        cfg = OmegaConf.load(Path(r["dir"]) / ".hydra" / "config.yaml")
        scored_at = cfg.data.get("eval_mask_prob") or cfg.data.mask_prob
        if not r["finished"] or cfg.task_name != "mlm" or abs(scored_at - mask_prob) < 1e-9:
            continue
        if datamodule is None:
            cfg.data.eval_mask_prob, cfg.data.num_workers = mask_prob, 0
            datamodule = ProteinDataModule.from_hparams(**OmegaConf.to_container(cfg.data, resolve=True))
        best = Path(r["dir"]) / "checkpoints" / Path(json.loads((Path(r["dir"]) / "metrics.json").read_text())
                                                     ["best_checkpoint"]).name
        score = score_checkpoint(best, "mlm", datamodule, cfg.trainer.limit_val_batches)
        r.update({"val_ppl": score["val_ppl"], "val_acc": score["val_acc"], "rescored": scored_at})
        print(f"{r['run']}: validated at {scored_at:.0%} masks; best checkpoint at {mask_prob:.0%}: "
              f"{100 * score['val_acc']:.2f}% / {score['val_ppl']:.3f}", flush=True)


def markdown_table(rows: list[dict]) -> str:
    """Rows sorted by validation perplexity (best first); unfinished runs last."""
    lines = ["| run | steps | train tokens/s | valid acc | valid ppl | Δppl vs best |",
             "|---|---|---|---|---|---|"]
    done = sorted((r for r in rows if r["finished"]), key=lambda r: r["val_ppl"])
    best = done[0]["val_ppl"] if done else float("nan")
    for r in done:
        rate = f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "–"
        note = f" (re-scored; its curve is at {r['rescored']:.0%} masks)" if r.get("rescored") else ""
        lines.append(f"| `{r['run']}`{note} | {r['global_step']:,} | {rate} | {100 * r['val_acc']:.2f}% | "
                     f"{r['val_ppl']:.3f} | {r['val_ppl'] - best:+.3f} |")
    for r in rows:
        if not r["finished"]:
            lines.append(f"| `{r['run']}` | unfinished (no metrics.json) | | | | |")
    if done:
        lines.append(f"\nUnigram baseline on the same validation residues: {100 * done[0]['baseline_acc']:.2f}% / "
                     f"{done[0]['baseline_ppl']:.3f}.")
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path, minutes: float | None = None) -> None:
    """Validation perplexity against step or, given the runs' equal wall-clock budget in ``minutes``, against
    training minutes (a budget-limited run spreads its steps evenly over the budget)."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.cm.tab20.colors  # distinct colours for up to 20 runs (the default cycle repeats after 10)
    for i, r in enumerate(sorted(rows, key=lambda r: r.get("val_ppl") or float("inf"))):
        curve = r["curve"]
        if curve.empty:
            continue
        xs = curve["step"] * (minutes / r["global_step"]) if minutes and r.get("global_step") else curve["step"]
        ax.plot(xs, curve["val/ppl"], marker=".", color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                linestyle="-" if i < 10 else "--", label=r["run"])
    baseline = next((r["baseline_ppl"] for r in rows if r.get("baseline_ppl")), None)
    if baseline:
        ax.axhline(baseline, color="grey", linestyle="--", label=f"unigram {baseline:.2f}")
    ax.set_xlabel("training minutes (steps spread over the budget)" if minutes else "optimizer step")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="directory whose subdirectories are runs (a sweep dir)")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.md, OUT.json, OUT.png")
    parser.add_argument("--minutes", type=float, default=None,
                        help="the runs' equal wall-clock budget: plot against minutes instead of steps")
    parser.add_argument("--rescore-masks", type=float, default=None, metavar="P",
                        help="MLM: re-score the best checkpoint of every run validated with a masking rate other "
                             "than P (runs before data.eval_mask_prob existed validated at their training rate)")
    args = parser.parse_args(argv)
    run_dirs = sorted(p for p in args.runs.iterdir() if (p / "csv").is_dir() or (p / "metrics.json").exists())
    if not run_dirs:
        raise SystemExit(f"error: {args.runs}: no run directories (with csv/ or metrics.json) inside")
    rows = [load_run(p) for p in run_dirs]
    if args.rescore_masks is not None:
        rescore(rows, args.rescore_masks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    payload = [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"].to_dict("records")} for r in rows]
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_curves(rows, args.out.with_suffix(".png"), args.minutes)
    print(table)
    print(f"\nwrote {args.out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
