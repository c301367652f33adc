"""Conversion that keeps what IgLM knows: FAVOR+ against attention transfer, on held-out antibody chains.

Uses the held-out split of ``fig5_real.py`` (run its ``data`` stage first: ``OUTDIR/data/{train,test}.fasta``)::

    nice -n 10 python studies/fig5_iglm/fig5_real.py runs/fig5_real --stages data
    OMP_NUM_THREADS=1 nice -n 10 python studies/fig5_iglm/transfer_study.py runs/fig5_real --model IgLM-S \\
        --features 256 64 --methods favor+ transfer hedgehog
    python studies/fig5_iglm/transfer_study.py runs/fig5_real --report

For each model, number of features m, method and projection draw: next-residue accuracy, perplexity and the mean
per-token KL divergence from the exact model's next-token distribution, on the held-out chains (IgLM framing
``[chain] [species] residues [SEP]``; heavy, light, and the human heavy chains of the issue's target), plus the
per-layer relative error of the attention output on the exact model's inputs. Methods:

- ``favor+``: ``pp-convert --attention favor`` (positive random features, no training);
- ``transfer``: attention transfer with the default map (FAVOR+ with a trained per-head Ψ and W,
  :mod:`proteinperformer.model.transfer`) on ``--calibration`` training-split chains, with its CPU-seconds (the
  chains only: pp-convert's recipe before issue 31's search, ``--transfer-augment 0``);
- ``transfer-mut``: the same on the chains plus 3 copies of each with 10% of residues replaced at random
  (``model.transfer.mutated_copies``): pp-convert's default recipe; ``transfer-aug``: the same started from
  ``oprf-rescaled``;
- ``hedgehog``: the same transfer with Hedgehog's map, softmax(Wx) ⊕ softmax(−Wx);
- ``oprf``, ``oprf-rescaled``, ``oprf-dense``: FAVOR++ (``pp-convert --features ... --calibrate``), A and Ψ (or M
  and the key shift) calibrated on the same chains, no training; ``transfer-oprf`` / ``transfer-dense``: attention
  transfer started from ``oprf-rescaled`` / ``oprf-dense``;
- ``transfer-wW`` / ``dense-wW`` / ``favor-wW`` (W = 4, 8, 16, 32, 64): the same with the sliding-window
  hybrid (exact softmax over each token's last W keys, ``pp-convert --window W``); ``--generate --window W``
  samples ``pp-convert --transfer --window W``; ``local-wW``: the window alone (no feature term: an ablation).

Each result is cached in ``OUTDIR/transfer/<model>_<method>_m<m>_d<draw>.json`` (the study resumes); ``--report``
writes ``results/transfer.{json,md,png}`` here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fig5_real import PROMPT, encode, iglm_dir, per_sequence, read_records  # this folder: the script's sys.path[0]

from proteinperformer.data.collate import IGNORE_INDEX
from proteinperformer.data.fasta import read_fasta
from proteinperformer.model import PerformerLM, calibrate_features, convert_attention
from proteinperformer.model.transfer import (
    calibration_batches,
    default_distill_steps,
    default_steps,
    distill_features,
    mutated_copies,
    transfer_attention,
    transfer_model,
)
from proteinperformer.training.scoring import evaluation_collator, residue_table

HERE = Path(__file__).resolve().parent
# method -> (kernel, features, trained): FAVOR+ / FAVOR++ (calibrated, no training) / attention transfer
METHODS = {"favor+": ("softmax", "favor+", False), "oprf": ("softmax", "oprf", False),
           "oprf-rescaled": ("softmax", "oprf-rescaled", False), "oprf-dense": ("softmax", "oprf-dense", False),
           "transfer": ("softmax", "favor+", True), "transfer-distill": ("softmax", "favor+", True),
           "transfer-oprf": ("softmax", "oprf-rescaled", True), "transfer-dense": ("softmax", "oprf-dense", True),
           "hedgehog": ("hedgehog", "favor+", True), "transfer-aug": ("softmax", "oprf-rescaled", True),
           "transfer-mut": ("softmax", "favor+", True)}
AUGMENT = {"transfer-aug": 3, "transfer-mut": 3}  # method -> mutated copies of each chain (transfer.mutated_copies)
# the sliding-window hybrid (attention/window.py, pp-convert --window W): exact softmax over the last W keys
# "transfer-wW": attention transfer (favor+) with the window in place; "dense-wW": calibrated oprf-dense and
# "favor-wW": FAVOR+, both without training; "local-wW": the window alone (an ablation: the feature term is dropped,
# so tokens older than W are not seen at all)
# "mut-wW": attention transfer with the window and pp-convert's default mutated copies (transfer-mut's recipe)
WINDOWS = {f"{base}-w{w}": w for base in ("transfer", "mut", "dense", "favor", "local") for w in (4, 8, 16, 32, 64)}
METHODS.update({name: ("softmax", "oprf-dense" if name.startswith("dense") else "favor+",
                       name.startswith(("transfer", "mut"))) for name in WINDOWS})
AUGMENT.update({name: 3 for name in WINDOWS if name.startswith("mut")})
GROUPS = ("heavy", "light", "human_heavy")
MODEL_SIZES = {"IgLM-S": (3, 192), "IgLM": (4, 512)}  # layers, width: what default_steps reads


def calibration_records(out: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` chains of the training split (random, fixed seed; heavy and light): what the transfer sees."""
    records = read_records(out / "data" / "train.fasta")
    pick = sorted(random.Random(seed).sample(range(len(records)), n))
    return [(records[i][0], records[i][2]) for i in pick]


def test_records(out: Path, per_chain: int) -> list[tuple[str, str, str]]:
    """(id, group, tagged sequence): ``per_chain`` held-out chains per chain type (fig5_real's sample)."""
    return [(rid, chain, seq) for rid, chain, seq in read_records(out / "data" / "test.fasta", per_chain)]


@torch.no_grad()
def score(model: PerformerLM, exact_logp: list[torch.Tensor], batches, records) -> dict:
    """Per group: next-residue accuracy, perplexity over residues and [SEP], mean per-token KL(exact ‖ model)."""
    alphabet = model.alphabet
    is_residue = residue_table(alphabet, model.config.vocab_size)
    sums = {g: [0.0, 0, 0, 0, 0.0] for g in GROUPS}  # nll, targets, hits, residues, kl
    for (rows, idx), lp_exact in zip(batches, exact_logp, strict=True):
        lp = F.log_softmax(model(rows["input_ids"], rows["padding_mask"])["logits"].double(), -1)
        labels = rows["labels"]
        for j, i in enumerate(idx):
            keep = labels[j] != IGNORE_INDEX
            y = labels[j][keep]
            lpj, lej = lp[j][keep], lp_exact[j][keep]
            groups = [records[i][1]] + (["human_heavy"] if records[i][1] == "heavy" and "[HUMAN]" in records[i][2]
                                        else [])
            res = is_residue[y]
            for g in groups:
                s = sums[g]
                s[0] -= float(lpj.gather(-1, y[:, None]).sum())
                s[1] += len(y)
                s[2] += int((lpj.argmax(-1)[res] == y[res]).sum())
                s[3] += int(res.sum())
                s[4] += float((lej.exp() * (lej - lpj)).sum())
    return {g: {"acc": s[2] / s[3], "ppl": math.exp(s[0] / s[1]), "kl": s[4] / s[1], "residues": s[3]}
            for g, s in sums.items() if s[1]}


def eval_batches(model: PerformerLM, records, batch: int = 32):
    """IgLM framing, next-token targets from the first residue to [SEP] (the tags' targets left out)."""
    a = model.alphabet
    collate = evaluation_collator(a, causal=True)
    tokens = [torch.tensor(a.encode(s, i).tolist() + [a.eos_idx]) for i, _, s in records]
    out = []
    for s in range(0, len(tokens), batch):
        rows = collate([{"tokens": t} for t in tokens[s : s + batch]])
        rows["labels"][:, :1] = IGNORE_INDEX  # the target after [chain] is the species tag
        out.append((rows, list(range(s, min(s + batch, len(tokens))))))
    return out


@torch.no_grad()
def layer_errors(exact: PerformerLM, model: PerformerLM, batches) -> list[float]:
    """Per layer ‖y − y_exact‖ / ‖y_exact‖ of the attention output on the exact model's inputs (real tokens)."""
    from proteinperformer.model.transfer import _relative_error, _targets, layer_inputs

    plain = [(rows["input_ids"], rows["padding_mask"]) for rows, _ in batches]
    paddings = [p for _, p in plain]
    return [math.sqrt(float(_relative_error(b.attn, _targets(e.attn, inputs, paddings))))
            for e, b, inputs in zip(exact.layers, model.layers, layer_inputs(exact, plain), strict=True)]


def run_one(out: Path, name: str, method: str, m: int, draw: int, steps: int | None, calibration: int,
            per_chain: int) -> dict:
    """One row (cached); ``steps`` None: pp-convert's default for this model and m (``default_steps``)."""
    rule = steps is None
    if rule:
        depth, width = MODEL_SIZES[name]
        steps = default_steps(depth, width, m)
    distill = default_distill_steps(steps) if method == "transfer-distill" else 0
    tag = f"_k{distill}" if distill else ""
    path = out / "transfer" / f"{name}_{method}_m{m}_d{draw}_s{steps}{tag}_c{calibration}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.manual_seed(0)
    exact = load_exact(name)
    records = test_records(out, per_chain)
    batches = eval_batches(exact, records)
    with torch.no_grad():
        exact_logp = [F.log_softmax(exact(r["input_ids"], r["padding_mask"])["logits"].double(), -1)
                      for r, _ in batches]
    kernel, features, trained = METHODS[method]
    window = WINDOWS.get(method, 0)
    cli = out / f"{name}_transfer_m{m}{tag}.ckpt"  # what generation() wrote with pp-convert --transfer: the same run
    info: dict = {"model": name, "method": method, "num_features": m, "draw": draw, "test_per_chain": per_chain}
    calib_records = calibration_records(out, calibration)
    if AUGMENT.get(method):
        calib_records = mutated_copies(calib_records, AUGMENT[method], seed=draw)
        info.update(augment=AUGMENT[method])
    calib = calibration_batches(exact.alphabet, calib_records, cls=False)
    t0 = time.process_time()
    reuse = cli.exists() and read_cli(cli)  # pp-convert's run, if it used this method's recipe
    if method in ("transfer", "transfer-distill") and draw == 0 and rule and reuse and reuse[0] == features and \
            reuse[1] == AUGMENT.get(method, 0):
        from proteinperformer.checkpoints import load_model, read_torch

        model, done = load_model(cli), read_torch(cli)["transfer"]
        assert done["sequences"] == calibration and done["steps"] == steps, done
        assert done.get("distill_steps", 0) == distill, done
        info.update(steps=steps, distill_steps=distill, default_steps=True, calibration_chains=calibration,
                    cpu_seconds=done["cpu_seconds"],
                    checkpoint=str(cli),
                    calibration_error=[(r["error_before"], r["error_after"]) for r in done["layers"]])
    elif not trained:
        model = convert_attention(exact, "favor", m, kernel, seed=draw, features=features, window=window).eval()
        if method.startswith("local-"):
            for block in model.layers:  # feature products scaled by e^-10000: only the window's keys count
                block.attn.window_logits = _without_features(block.attn.window_logits)
        if features != "favor+":
            calibrate_features(model, [tokens for tokens, _ in calib])
            info.update(calibration_chains=calibration, cpu_seconds=time.process_time() - t0)
    else:
        model = transfer_model(exact, m, kernel, seed=draw, features=features, window=window)
        layers = transfer_attention(exact, model, calib, steps=steps)
        if distill:
            kl = distill_features(exact, model, calib, distill)
            info.update(distill_kl=kl[:2])
        info.update(steps=steps, distill_steps=distill, default_steps=rule, calibration_chains=calibration,
                    cpu_seconds=time.process_time() - t0,
                    calibration_error=[(r.error_before, r.error_after) for r in layers])
    info["scores"] = score(model, exact_logp, batches, records)
    info["exact"] = score(exact, exact_logp, batches, records)
    info["layer_error"] = layer_errors(exact, model, batches[:1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    s, e = info["scores"]["human_heavy"], info["exact"]["human_heavy"]
    print(f"{name} {method} m={m} draw {draw}: human heavy {100 * s['acc']:.2f}% / {s['ppl']:.3f} (exact "
          f"{100 * e['acc']:.2f}% / {e['ppl']:.3f}), KL {s['kl']:.4f}, layer error "
          f"{[round(x, 3) for x in info['layer_error']]}"
          + (f", transfer {info['cpu_seconds']:.1f} CPU-s" if "cpu_seconds" in info else ""), flush=True)
    return info


def _without_features(window_logits):
    """A layer's ``window_logits`` with the feature term's log-scale lowered by 10,000 (the "local-wW" ablation)."""
    def logits(q, k, heads=None):
        ql, kl, shift = window_logits(q, k, heads)
        return ql, kl, shift - 1e4
    return logits


def read_cli(path: Path) -> tuple[str, int]:
    """(features, mutated copies) of a ``pp-convert --transfer`` checkpoint (older ones: no copies)."""
    from proteinperformer.checkpoints import read_torch

    saved = read_torch(path)
    return saved["hyper_parameters"]["config"].get("features", "favor+"), saved["transfer"].get("augment", 0)


def generation(out: Path, name: str, m: int, calibration: int, num_samples: int = 100,
               exact_samples: bool = True, window: int = 0) -> dict:
    """The CLI route end to end: ``pp-convert <name> --transfer <calibration chains> --no-cls`` (its defaults; its
    CPU-seconds), then ``pp-generate`` samples (prompt PROMPT) of exact IgLM, exact ``name`` and the transferred
    model, each scored by the exact IgLM (13M) in IgLM's framing (``exact_samples=False``: only the transferred
    model's; the exact models' samples of ``fig5_real.py --stages generation`` are the same command)."""
    tag = f"_w{window}" if window else ""  # pp-convert's defaults: no distillation; --window W
    path = out / "transfer" / f"generation_{name}_m{m}{tag}_c{calibration}.json"
    if path.exists():
        return json.loads(path.read_text())
    fasta = out / f"calibration{calibration}.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in calibration_records(out, calibration)))
    ckpt = out / f"{name}_transfer_m{m}{tag}.ckpt"
    convert = [sys.executable, "-m", "proteinperformer.cli.convert", str(iglm_dir(name)), "--out", str(ckpt),
               "--transfer", str(fasta), "--num-features", str(m), "--no-cls", "--window", str(window)]
    result: dict = {"convert_command": "pp-convert " + " ".join(convert[3:])}
    if not ckpt.exists():
        subprocess.run(convert, check=True)
    result["transfer"] = torch.load(ckpt, weights_only=True)["transfer"]
    judge = load_exact("IgLM")
    sources = {"IgLM exact": iglm_dir("IgLM"), f"{name} exact": iglm_dir(name)} if exact_samples else {}
    sources[f"{name} FAVOR+ m={m} transferred{tag}"] = ckpt
    for label, source in sources.items():
        samples = out / "generation" / f"{label.replace(' ', '_').replace('=', '')}.fasta"
        samples.parent.mkdir(parents=True, exist_ok=True)
        if not samples.exists():
            subprocess.run([sys.executable, "-m", "proteinperformer.cli.generate", str(source), "--out", str(samples),
                            "--num-samples", str(num_samples), "--max-length", "150", "--prompt", PROMPT, "--seed",
                            "0", "--no-cls"], check=True)
        seqs = [r.sequence for r in read_fasta(samples)]
        recs = [(f"s{i}", "heavy", "[HEAVY][HUMAN]" + s) for i, s in enumerate(seqs)]
        rows = per_sequence(judge, encode(judge, recs, False), False)
        ppl = sorted(math.exp(r["nll"] / r["n"]) for r in rows)
        result[label] = {"samples": len(seqs), "exact_iglm_ppl_mean": sum(ppl) / len(ppl),
                         "exact_iglm_ppl_median": ppl[len(ppl) // 2],
                         "length_median": sorted(map(len, seqs))[len(seqs) // 2]}
        print(label, result[label], flush=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_exact(name: str) -> PerformerLM:
    from proteinperformer.checkpoints import load_model

    return load_model(iglm_dir(name)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--model", nargs="+", default=["IgLM-S"], choices=("IgLM-S", "IgLM"))
    parser.add_argument("--features", type=int, nargs="+", default=[256, 64, 128, 512])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--draws", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help="transfer steps per layer (default: pp-convert's, default_steps)")
    parser.add_argument("--calibration", type=int, default=15, help="training-split chains the transfer sees")
    parser.add_argument("--per-chain", type=int, default=60, help="held-out chains scored per chain type")
    parser.add_argument("--generate", action="store_true",
                        help="pp-convert --transfer + pp-generate of each --model at the first --features")
    parser.add_argument("--converted-only", action="store_true",
                        help="with --generate: sample only the transferred model (fig5_real.py sampled the exact ones)")
    parser.add_argument("--window", type=int, default=0,
                        help="with --generate: pp-convert --transfer --window W (the sliding-window hybrid)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report(args.outdir, HERE / "results")
        return
    if args.generate:
        for name in args.model:
            generation(args.outdir, name, args.features[0], args.calibration, exact_samples=not args.converted_only,
                       window=args.window)
        return
    for name in args.model:
        for m in args.features:
            for method in args.methods:
                for draw in args.draws:
                    run_one(args.outdir, name, method, m, draw, args.steps, args.calibration, args.per_chain)


def _mean(rows: list[dict], get) -> tuple[float, float | None]:
    vals = [get(r) for r in rows]
    mean = sum(vals) / len(vals)
    return mean, (max(vals) - min(vals)) / 2 if len(vals) > 1 else None


def report(out: Path, results: Path) -> None:
    """``results/transfer.{json,md,png}``: every run, a table (mean ± half-range over draws) and accuracy vs m."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "transfer").glob("*.json"))
            if not p.name.startswith("generation_")]
    runs = [r for r in runs if r["method"] in METHODS]  # the shared OUTDIR also holds other branches' methods
    generated = {p.stem: json.loads(p.read_text()) for p in sorted((out / "transfer").glob("generation_*.json"))
                 if re.fullmatch(r"generation_[\w-]+_m\d+(_k\d+)?(_w\d+)?_c\d+", p.stem)}  # this script's runs
    results.mkdir(parents=True, exist_ok=True)
    (results / "transfer.json").write_text(json.dumps({"runs": runs, "generation": generated}, indent=2) + "\n")
    order = list(METHODS)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], order.index(r["method"]), r["num_features"], r.get("steps") or 0,
                           r.get("distill_steps") or 0), []).append(r)
    head = ("| model | method | m | draws | human heavy acc. | ppl | KL | heavy acc. | light acc. | light ppl | "
            "attention error per layer | CPU-s (calibration, transfer) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    done_exact = set()
    for (model, mi, m, steps, distill), rows in sorted(groups.items()):
        if model not in done_exact:
            e = rows[0]["exact"]
            lines.append(f"| {model} | exact | – | – | {100 * e['human_heavy']['acc']:.2f}% | "
                         f"{e['human_heavy']['ppl']:.3f} | 0 | {100 * e['heavy']['acc']:.2f}% | "
                         f"{100 * e['light']['acc']:.2f}% | {e['light']['ppl']:.3f} | 0 | – |")
            done_exact.add(model)
        cells = []
        for group, key, scale, fmt in (("human_heavy", "acc", 100, "{:.2f}%"), ("human_heavy", "ppl", 1, "{:.3f}"),
                                       ("human_heavy", "kl", 1, "{:.4f}"), ("heavy", "acc", 100, "{:.2f}%"),
                                       ("light", "acc", 100, "{:.2f}%"), ("light", "ppl", 1, "{:.3f}")):
            mean, spread = _mean(rows, lambda r, g=group, k=key, s=scale: s * r["scores"][g][k])
            cells.append(fmt.format(mean) + ("" if spread is None else f" ± {fmt.format(spread).rstrip('%')}"))
        err = [sum(r["layer_error"][i] for r in rows) / len(rows) for i in range(len(rows[0]["layer_error"]))]
        cpu = f"{_mean(rows, lambda r: r['cpu_seconds'])[0]:.1f}" if "cpu_seconds" in rows[0] else "–"
        how = f" ({steps} steps" + (f" + {distill} KL)" if distill else ")")
        method = order[mi] + (how if steps and METHODS.get(order[mi], ("", "", False))[2] else "")
        lines.append(f"| {model} | {method} | {m} | {len(rows)} | {' | '.join(cells)} | "
                     f"{' / '.join(f'{x:.3f}' for x in err)} | {cpu} |")
    for g in generated.values():
        command = g["convert_command"].replace(str(iglm_dir().parent), "$IGLM").replace(str(out), "OUTDIR")
        lines += ["", f"`{command}`: {g['transfer']['cpu_seconds']:.1f} CPU-s", "",
                  "| samples (prompt [HEAVY][HUMAN]EVQ) | n | exact IgLM ppl, mean | median | length median |",
                  "|---|---:|---:|---:|---:|"]
        for label, row in g.items():
            if isinstance(row, dict) and "exact_iglm_ppl_mean" in row:
                lines.append(f"| {label} | {row['samples']} | {row['exact_iglm_ppl_mean']:.3f} | "
                             f"{row['exact_iglm_ppl_median']:.3f} | {row['length_median']} |")
    (results / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in runs if r["model"] == model and (r.get("steps") is None or r.get("default_steps"))]
        ax.axhline(100 * mine[0]["exact"]["human_heavy"]["acc"], color="k", ls="--", label="exact attention")
        for method in order:
            ms = sorted({r["num_features"] for r in mine if r["method"] == method})
            if not ms:
                continue
            acc = [_mean([r for r in mine if r["method"] == method and r["num_features"] == m],
                         lambda r: 100 * r["scores"]["human_heavy"]["acc"])[0] for m in ms]
            ax.plot(ms, acc, "o-", label=method, color=f"C{order.index(method) % 10}")  # one colour per method
        ax.set_xscale("log", base=2)
        ax.set_xlabel("features per head m")
        ax.set_title(f"{model}: held-out human heavy chains (default transfer steps)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("next-residue accuracy (%)")
    for ax in axes[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(results / "transfer.png", dpi=120)
    print(f"wrote {results / 'transfer.png'}")


if __name__ == "__main__":
    main()
