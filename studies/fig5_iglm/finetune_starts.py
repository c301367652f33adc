"""Fig. 5 with three starts: the short fine-tune of ``fig5_real.py`` started from FAVOR+, from calibrated FAVOR++
(``oprf-dense``, no training) and from attention transfer, beside the same network trained from scratch.

Uses the held-out split and calibration chains of ``fig5_real.py`` / ``transfer_study.py`` (OUTDIR/data,
OUTDIR/calibration15.fasta, OUTDIR/<model>_transfer_m256.ckpt) and writes everything under ``OUTDIR/starts/``, so
nothing of the other studies is overwritten::

    S="nice -n 10 python studies/fig5_iglm/finetune_starts.py runs/fig5_real"     # with OMP_NUM_THREADS=1
    $S --stages starts                      # the start checkpoints (seconds)
    nohup $S --stages train --stop-at 300 > runs/starts300.log &   # every start to 300 steps first
    nohup $S --stages train > runs/starts1000.log &                # then on to 1,000 (resumes from last.ckpt)
    $S --stages scored report               # scores at 0 / 100 / 300 / 1,000 steps; results/finetune_starts.*

Starts (IgLM-S, m = 256, projection draw 0, i.e. the same ω as ``fig5_real.py``'s fine-tuned FAVOR+ model):

- ``favor+``: ``pp-convert --attention favor`` (what ``fig5_real.py --stages train`` fine-tunes);
- ``oprf-dense``: FAVOR++ dense features, M and the key shift calibrated per layer × head on the 15 calibration
  chains in IgLM's framing (``transfer_study.py``'s ``oprf-dense`` row, draw 0), frozen buffers, no training;
- ``transfer``: ``pp-convert --transfer OUTDIR/calibration15.fasta --no-cls`` with its default steps (the
  checkpoint ``transfer_study.py --generate`` wrote, copied here so a later transfer recipe cannot change it);
- ``scratch``: the same architecture from random weights (seed 0), lr 1e-3 as in ``fig5_real.py``.

Every converted start is fine-tuned with one recipe, ``fig5_real.py``'s but in float32 (``--precision``; its
bf16-mixed autocast is 4.5x slower per CPU step here): ``pp-train init_from=<start> task=clm``, batch 4, lr 2e-4,
warmup 50, cosine to ``--max-steps`` (1,000), no feature redraw, a checkpoint every 100 steps; the runs go one
after another (``--starts`` order), each on one thread, and resume from their ``last.ckpt``. ``pp-train`` frames
sequences as ``[CLS] … [SEP]``, so every fine-tuned row (and its
step 0) is scored with a leading ``[CLS]``; step 0 is also scored in IgLM's framing (the no-training number).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from fig5_real import (  # this folder: the script's sys.path[0]
    CHAIN_TAGS,
    SCORE_PER_CHAIN,
    _cells,
    checkpoint_at,
    encode,
    iglm_dir,
    per_sequence,
    read_records,
    style_steps_axis,
    summarise,
    train_command,
)
from transfer_study import calibration_records

from proteinperformer.checkpoints import load_model, save_checkpoint
from proteinperformer.model import PerformerLM, calibrate_features, convert_attention
from proteinperformer.model.transfer import calibration_batches

HERE = Path(__file__).resolve().parent
STAGES = ("starts", "train", "scored", "report")
STARTS = ("favor+", "oprf-dense", "transfer", "scratch")
LR = {"favor+": 2e-4, "oprf-dense": 2e-4, "transfer": 2e-4, "scratch": 1e-3}  # fig5_real.py's two rates
LABELS = {"favor+": "FAVOR+ (pp-convert)", "oprf-dense": "FAVOR++ oprf-dense, calibrated, no training",
          "transfer": "attention transfer (pp-convert --transfer)", "scratch": "from scratch, same size"}
FEATURES = 256
CALIBRATION = 15
STEPS = (100, 300, 1000)


def start_path(out: Path, model: str, start: str) -> Path:
    return out / "starts" / f"{model}_{start}_m{FEATURES}.ckpt"


def make_starts(out: Path, model: str) -> dict:
    """The four start checkpoints under OUTDIR/starts (each kept when it exists) and how each was made."""
    exact = load_model(iglm_dir(model)).eval()
    made = {}
    for start in STARTS:
        path = start_path(out, model, start)
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.process_time()
        if start == "transfer":
            source = out / f"{model}_transfer_m{FEATURES}.ckpt"
            if not source.exists():
                sys.exit(f"error: {source} is missing; run transfer_study.py {out} --model {model} --generate "
                         "--converted-only first (pp-convert --transfer with its defaults)")
            if not path.exists():
                shutil.copyfile(source, path)
            made[start] = {"from": str(source), "transfer": torch.load(path, weights_only=True)["transfer"]}
            made[start]["transfer"].pop("layers", None)
            continue
        if not path.exists():
            if start == "scratch":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    net = PerformerLM(convert_attention(exact, "favor", FEATURES, "softmax", seed=0).config)
            else:
                net = convert_attention(exact, "favor", FEATURES, "softmax", seed=0, features=start).eval()
                if start == "oprf-dense":
                    calib = calibration_batches(exact.alphabet, calibration_records(out, CALIBRATION), cls=False)
                    calibrate_features(net, [tokens for tokens, _ in calib])
            save_checkpoint(net, path, "random init" if start == "scratch" else iglm_dir(model))
        made[start] = {"cpu_seconds": round(time.process_time() - t0, 2)}
        print(f"{start}: {path}", flush=True)
    return made


def train(out: Path, model: str, starts: list[str], max_steps: int, batch_size: int, stop_at: int | None,
          precision: str) -> None:
    """pp-train from each start, one run after another on one thread (each resumes from its last.ckpt).
    ``stop_at``: stop a run once its checkpoint of that step is written (the schedule stays ``max_steps`` long,
    so a later call continues it exactly: every start reaches 300 steps before any goes on to 1,000)."""
    for start in starts:
        run = Path("starts") / model / start
        ckpts = out / run / "checkpoints"
        if (out / run / "metrics.json").exists() or (stop_at and (ckpts / f"step{stop_at}.ckpt").exists()):
            print(f"{start}: done", flush=True)
            continue
        cmd = [f"trainer.precision={precision}" if c.startswith("trainer.precision=") else c
               for c in train_command(out, str(run), start_path(out, model, start), LR[start], batch_size, max_steps)]
        print("+", " ".join(cmd), flush=True)
        (out / run).mkdir(parents=True, exist_ok=True)
        with open(out / run / "train.log", "a") as log:
            proc = subprocess.Popen(cmd, cwd=HERE.parents[1], stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            while proc.poll() is None:
                time.sleep(5)
                done, last = ckpts / f"step{stop_at}.ckpt", ckpts / "last.ckpt"
                if stop_at and done.exists() and last.exists() and last.stat().st_mtime >= done.stat().st_mtime:
                    time.sleep(10)  # let last.ckpt's write finish
                    proc.kill()  # Lightning traps SIGTERM (it would save and go on)
                    proc.wait()
                    print(f"{start}: stopped at step {stop_at}", flush=True)
            if proc.returncode and not (stop_at and (ckpts / f"step{stop_at}.ckpt").exists()):
                sys.exit(f"error: the {start} run failed; see {out / run / 'train.log'}")


def steps_reached(run: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("step")) for p in (run / "checkpoints").glob("step*.ckpt")
                  if p.stem.removeprefix("step").isdigit())


def scored(out: Path, model: str, starts: list[str]) -> dict:
    """Per start: step 0 (IgLM framing and [CLS] framing) and every STEPS checkpoint the run reached, plus its
    last one; cached per (start, step) in OUTDIR/starts/scores/ so that a longer run only adds rows."""
    records = read_records(out / "data" / "test.fasta", SCORE_PER_CHAIN)
    chains = [c for _, c, _ in records]
    cache = out / "starts" / "scores"
    cache.mkdir(parents=True, exist_ok=True)

    def score(label: str, path: Path, cls: bool) -> dict:
        file = cache / f"{model}_{label}.json"
        if not file.exists():
            net = load_model(path).eval()
            file.write_text(json.dumps(summarise(per_sequence(net, encode(net, records, cls), cls), chains)) + "\n")
        return json.loads(file.read_text())

    result = {"model": model, "test_per_chain": SCORE_PER_CHAIN, "exact": score("exact", iglm_dir(model), False),
              "starts": {}}
    for start in starts:
        row = {"iglm_framing": score(f"{start}_iglm", start_path(out, model, start), False),
               "steps": {"0": score(f"{start}_0", start_path(out, model, start), True)}}
        run = out / "starts" / model / start
        reached = steps_reached(run) if (run / "checkpoints").exists() else []
        for step in sorted({s for s in STEPS if s in reached} | set(reached[-1:])):
            row["steps"][str(step)] = score(f"{start}_{step}", checkpoint_at(run, step), True)
        result["starts"][start] = row
        print(start, {k: round(100 * v["heavy"]["acc"], 2) for k, v in row["steps"].items()}, flush=True)
    return result


def report(out: Path, model: str, results: Path, made: dict) -> None:
    """``results/finetune_starts.{json,md,png}``: the table and the Fig. 5 analogue with one curve per start."""
    data = {**json.loads((out / "starts" / f"scored_{model}.json").read_text()), "starts_made": made}
    results.mkdir(parents=True, exist_ok=True)
    (results / "finetune_starts.json").write_text(json.dumps(data, indent=2) + "\n")
    head = "| heavy acc. | light acc. | ppl (both) |"
    lines = [f"| {model}, held-out ({data['test_per_chain']} chains per type) | steps {head}",
             "|---|---:|---:|---:|---:|",
             f"| exact attention, IgLM framing | – | {_cells([data['exact']])} |"]
    for start, row in data["starts"].items():
        if start != "scratch":
            lines.append(f"| {LABELS[start]}, IgLM framing | 0 | {_cells([row['iglm_framing']])} |")
    for start, row in data["starts"].items():
        for step, sc in sorted(row["steps"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {LABELS[start]}, {'trained' if start == 'scratch' else 'fine-tuned'} | {step} | "
                         f"{_cells([sc])} |")
    (results / "finetune_starts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, chain in zip(axes, CHAIN_TAGS, strict=True):
        ax.axhline(100 * data["exact"][chain]["acc"], color="k", ls="--", label=f"{model}, exact attention")
        for i, (start, row) in enumerate(data["starts"].items()):
            steps = sorted(int(k) for k in row["steps"])
            ax.plot(steps, [100 * row["steps"][str(k)][chain]["acc"] for k in steps], "s-" if start == "scratch"
                    else "o-", color=f"C{i}", label=f"{LABELS[start]}" + ("" if start == "scratch" else
                                                                           f", m={FEATURES}"))
            if start != "scratch":  # the same start in IgLM's framing (no [CLS]): the no-training number
                ax.plot([0], [100 * row["iglm_framing"][chain]["acc"]], "o", mfc="none", color=f"C{i}")
        style_steps_axis(ax, chain, "fine-tuning steps (batch 4); open markers: step 0 without [CLS]")
    axes[0].set_ylabel("next-residue accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{model} as a Performer: fine-tuning from FAVOR+, FAVOR++ and attention transfer")
    fig.tight_layout()
    fig.savefig(results / "finetune_starts.png", dpi=120)
    print(f"wrote {results / 'finetune_starts.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS),
                        help="train / scored / report: these starts, in this order")
    parser.add_argument("--model", default="IgLM-S", choices=("IgLM-S", "IgLM"))
    parser.add_argument("--max-steps", type=int, default=STEPS[-1],
                        help="the cosine schedule's length (fig5_real.py: 1,000); a run stopped earlier is scored "
                             "at the checkpoints it reached")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="train: stop each run at this step's checkpoint (resume later without it)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="32", choices=("32", "bf16-mixed"),
                        help="pp-train's trainer.precision (fig5_real.py: bf16-mixed, which on this CPU makes a step "
                             "of IgLM-S about 4.5x slower than float32)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.outdir
    for stage in args.stages:
        print(f"== {stage}", flush=True)
        if stage == "starts":
            made = make_starts(out, args.model)
            (out / "starts" / f"made_{args.model}.json").write_text(json.dumps(made, indent=2) + "\n")
        elif stage == "train":
            train(out, args.model, args.starts, args.max_steps, args.batch_size, args.stop_at,
                  args.precision)
        elif stage == "scored":
            result = scored(out, args.model, args.starts)
            (out / "starts" / f"scored_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
        else:
            report(out, args.model, args.results,
                   json.loads((out / "starts" / f"made_{args.model}.json").read_text()))


if __name__ == "__main__":
    main()
