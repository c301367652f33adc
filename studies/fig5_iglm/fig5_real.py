"""The Performer paper's Fig. 5 on real weights: IgLM (a trained GPT-2 antibody LM) converted to FAVOR+.

Needs the optional ``iglm`` package (its wheel ships the trained weights; JHU Academic Software License, non-commercial:
an optional extra for this experiment, never a dependency of proteinperformer, and its weights are never copied
into this repository)::

    pip install -c constraints-cpu.txt --no-deps iglm      # transformers is already there with the [dev] extra
    nice -n 10 python studies/fig5_iglm/fig5_real.py runs/fig5_real --stages data exactness conversion
    nice -n 10 nohup python studies/fig5_iglm/fig5_real.py runs/fig5_real --stages train > runs/fig5_real/train.log &
    nice -n 10 python studies/fig5_iglm/fig5_real.py runs/fig5_real --stages finetuned generation report

Stages (each writes its result under OUTDIR and is skipped when that exists, so the script resumes; training
resumes from the runs' ``last.ckpt``):

- ``data``: ``antibodies.csv`` (shared data) -> chains with an IgLM species tag (human and humanized -> [HUMAN],
  mouse, rat), clustered at 90% identity (greedy, CD-HIT style; MMseqs2 is not installed here), clusters split
  into a held-out test set (~12% of sequences) and a disjoint training set. Writes ``data/{train,test}.fasta``
  with IgLM's conditioning tags in each sequence (``[HEAVY][HUMAN]EVQL...``).
- ``exactness``: ``load_model(<iglm>/trained_models/IgLM[-S])`` (exact attention) against
  ``transformers.GPT2LMHeadModel.from_pretrained`` of the same directory on 150 test sequences per chain type
  (IgLM's framing ``[chain] [species] residues [SEP]``; the log-likelihood is the mean next-token log-probability
  from the first residue to ``[SEP]``).
- ``conversion``: next-residue accuracy / perplexity per chain type (60 test sequences each) of the exact
  ``--train-model`` and of FAVOR+ (causal; softmax kernel with m = 64/128/256/512 features, 3 projection draws
  each; the ReLU kernel), and the relative error of each layer's attention output on 16 of them. ``--draws d``
  computes only draw d, one process per draw (run three side by side, then a run without ``--draws`` merges them).
- ``train``: ``pp-train init_from=<train-model converted to FAVOR+, m=256> task=clm`` on the training split
  (bf16-mixed on the CPU, batch 4, lr 2e-4) for up to 1,000 steps with a checkpoint every 100, and beside it a
  same-size FAVOR+ model from random weights (lr 1e-3). ``pp-train`` frames every sequence as ``[CLS] ... [SEP]``,
  so these models (and their step 0) are scored with a leading ``[CLS]``.
- ``finetuned``: scores of both runs at 0 / 100 / 300 / 1,000 steps and the last step reached.
- ``generation``: 100 samples (prompt ``[HEAVY][HUMAN]EVQ``) from exact IgLM, exact / converted / fine-tuned
  ``--train-model`` with ``pp-generate``, each scored by the exact IgLM (13M).
- ``report``: ``--results`` (default: this study's ``results/``) ``fig5_real.{json,md,png}`` (every number, the
  tables, the plot).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from proteinperformer.checkpoints import load_model, save_checkpoint  # noqa: E402
from proteinperformer.data.collate import IGNORE_INDEX  # noqa: E402
from proteinperformer.evaluation.conversion import attention_errors  # noqa: E402
from proteinperformer.model import PerformerLM, convert_attention  # noqa: E402
from proteinperformer.training.scoring import batch_sums, evaluation_collator, residue_table  # noqa: E402

STAGES = ("data", "exactness", "conversion", "train", "finetuned", "generation", "report")
CHAIN_TAGS = {"heavy": "[HEAVY]", "light": "[LIGHT]"}
SPECIES_TAGS = {"human": "[HUMAN]", "humanized": "[HUMAN]", "mouse": "[MOUSE]", "rat": "[RAT]"}
FEATURES = (64, 128, 256, 512)
DRAWS = 3
TRAIN_FEATURES = 256  # the FAVOR+ model that is fine-tuned (pp-convert's default)
STEPS = (100, 300, 1000)
PROMPT = "[HEAVY][HUMAN]EVQ"
EVAL_PER_CHAIN = 150  # held-out sequences scored per chain type (exactness, fine-tuning)
SCORE_PER_CHAIN = 60  # the same for the 13 FAVOR+ conversions and the fine-tuning checkpoints (2 shared cores)
HERE = Path(__file__).resolve().parent  # studies/fig5_iglm: results/ is written here
ROOT = HERE.parents[1]  # the repository: scripts/train.py, and the working directory of the runs


# ---- data ---------------------------------------------------------------------------------------
def iglm_dir(name: str = "IgLM") -> Path:
    spec = importlib.util.find_spec("iglm")
    if spec is None or spec.origin is None:
        sys.exit("error: the iglm package is not installed; pip install -c constraints-cpu.txt --no-deps iglm "
                 "(JHU Academic Software License, non-commercial use only)")
    return Path(spec.origin).parent / "trained_models" / name


def kmers(seq: str, k: int = 5) -> set[str]:
    return {seq[i : i + k] for i in range(len(seq) - k + 1)}


def cluster(seqs: list[str], identity: float = 0.9) -> list[int]:
    """Greedy CD-HIT-style clustering: longest first, each sequence joins the first representative it matches at
    ≥ ``identity`` (identities of a free-gap global alignment / the shorter length), else founds a cluster.
    Candidates are pre-filtered by shared 5-mers (≥ 30% of the shorter's). Returns a cluster id per sequence."""
    from Bio.Align import PairwiseAligner

    aligner = PairwiseAligner(mode="global", match_score=1, mismatch_score=0, open_gap_score=0,
                              extend_gap_score=0)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    index: dict[str, list[int]] = defaultdict(list)  # k-mer -> representatives holding it
    labels = [-1] * len(seqs)
    reps: list[int] = []
    for i in order:
        mine = kmers(seqs[i])
        shared = Counter(r for km in mine for r in index[km])
        for r, n in shared.most_common():
            if n < 0.3 * min(len(mine), len(kmers(seqs[r]))):
                break
            if aligner.score(seqs[i], seqs[r]) / min(len(seqs[i]), len(seqs[r])) >= identity:
                labels[i] = labels[r]
                break
        if labels[i] < 0:
            labels[i] = len(reps)
            reps.append(i)
            for km in mine:
                index[km].append(i)
    return labels


def stage_data(out: Path, csv: Path, test_share: float = 0.12) -> dict:
    import pandas as pd

    table = pd.read_csv(csv)
    table = table[table.species.isin(SPECIES_TAGS)].reset_index(drop=True)
    t0 = time.time()
    labels = cluster(list(table.sequence))
    table["cluster"] = labels
    clusters = sorted(set(labels))
    random.Random(0).shuffle(clusters)
    sizes = table.cluster.value_counts()
    test, n = set(), 0
    for c in clusters:
        if n >= test_share * len(table):
            break
        test.add(c)
        n += int(sizes[c])
    table["split"] = ["test" if c in test else "train" for c in table.cluster]
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        part = table[table.split == split]
        text = "".join(f">{r.id} chain={r.chain} species={r.species}\n{CHAIN_TAGS[r.chain]}{SPECIES_TAGS[r.species]}"
                       f"{r.sequence}\n" for r in part.itertuples())
        (out / "data" / f"{split}.fasta").write_text(text)
    table.to_csv(out / "data" / "split.csv", index=False)
    counts = {f"{s}_{c}": int(((table.split == s) & (table.chain == c)).sum()) for s in ("train", "test")
              for c in CHAIN_TAGS}
    return {"sequences": len(table), "clusters": len(clusters), "test_clusters": len(test),
            "cluster_seconds": round(time.time() - t0, 1), **counts,
            "clustering": "greedy CD-HIT style at 90% identity (free-gap global alignment identities / shorter "
                          "length, 5-mer prefilter); MMseqs2 not installed"}


def read_records(fasta: Path, per_chain: int | None = None) -> list[tuple[str, str, str]]:
    """(id, chain, tagged sequence) of a FASTA written by stage_data; ``per_chain``: a fixed random sample
    (seed 0) of that many sequences per chain type, in file order."""
    out, lines = [], fasta.read_text().splitlines()
    for header, seq in zip(lines[0::2], lines[1::2], strict=True):
        out.append((header[1:].split()[0], header.split("chain=")[1].split()[0], seq))
    if per_chain is not None:
        keep = set()
        for chain in CHAIN_TAGS:
            idx = [i for i, r in enumerate(out) if r[1] == chain]
            keep |= set(random.Random(0).sample(idx, min(per_chain, len(idx))))
        out = [r for i, r in enumerate(out) if i in keep]
    return out


# ---- scoring ------------------------------------------------------------------------------------
def encode(model: PerformerLM, records, cls: bool) -> list[torch.Tensor]:
    """IgLM framing ``[chain] [species] residues [SEP]``, with a leading [CLS] for pp-train's models."""
    a = model.alphabet
    return [torch.tensor(([a.cls_idx] if cls else []) + a.encode(s, i).tolist() + [a.eos_idx]) for i, _, s in records]


@torch.no_grad()
def per_sequence(model, tokens: list[torch.Tensor], cls: bool, batch: int = 32, hf: bool = False,
                 alphabet=None) -> list[dict]:
    """Per sequence: summed NLL and count of the targets from the first residue to [SEP], residue hits and count
    (``batch_sums`` of the package's next-token targets, the tags' targets left out). ``alphabet``: the
    vocabulary of ``tokens`` (default the model's; give it for a Hugging Face model)."""
    alphabet = model.alphabet if alphabet is None else alphabet
    collate = evaluation_collator(alphabet, causal=True)  # input tokens[:, :-1], labels tokens[:, 1:], pad ignored
    is_residue = residue_table(alphabet)
    skip = 2 + int(cls)  # targets start at the first residue (after the tags)
    out = []
    for s in range(0, len(tokens), batch):
        rows = collate([{"tokens": r} for r in tokens[s : s + batch]])
        labels = rows["labels"]
        labels[:, : skip - 1] = IGNORE_INDEX
        if hf:
            logits = model(input_ids=rows["input_ids"], attention_mask=(~rows["padding_mask"]).long()).logits
        else:
            logits = model(rows["input_ids"], rows["padding_mask"])["logits"]
        for j in range(len(labels)):
            sums = batch_sums(logits[j : j + 1], labels[j : j + 1], is_residue, torch.float64)
            out.append({"nll": float(sums["nll"]), "n": int(sums["n_supervised"]),
                        "hits": int(sums["residue_correct"]), "residues": int(sums["n_residue"])})
    return out


def summarise(rows: list[dict], chains: list[str]) -> dict:
    """Per chain type: next-residue accuracy and perplexity (exp mean NLL over residues and [SEP])."""
    out = {}
    for chain in (*CHAIN_TAGS, "all"):
        pick = [r for r, c in zip(rows, chains, strict=True) if chain in ("all", c)]
        if not pick:
            continue
        nll, n = sum(r["nll"] for r in pick), sum(r["n"] for r in pick)
        out[chain] = {"acc": sum(r["hits"] for r in pick) / sum(r["residues"] for r in pick),
                      "ppl": math.exp(nll / n), "sequences": len(pick)}
    return out


def cached(path: Path, fn, *args, **kwargs) -> dict:
    if not path.exists():
        result = fn(*args, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(path.read_text())


def stage_exactness(out: Path) -> dict:
    from transformers import GPT2LMHeadModel

    records = read_records(out / "data" / "test.fasta", EVAL_PER_CHAIN)
    result = {}
    for name in ("IgLM", "IgLM-S"):
        ours = load_model(iglm_dir(name))
        ref = GPT2LMHeadModel.from_pretrained(iglm_dir(name)).eval()
        tokens = encode(ours, records, cls=False)
        a, b = per_sequence(ours, tokens, False), per_sequence(ref, tokens, False, hf=True, alphabet=ours.alphabet)
        diff = [abs(x["nll"] / x["n"] - y["nll"] / y["n"]) for x, y in zip(a, b, strict=True)]
        human_heavy = [i for i, (rid, c, s) in enumerate(records) if c == "heavy" and "[HUMAN]" in s][:60]
        result[name] = {"sequences": len(records), "max_abs_ll_diff": max(diff),
                        "mean_abs_ll_diff": sum(diff) / len(diff), "parameters": ours.num_parameters(),
                        "ours": summarise(a, [c for _, c, _ in records]),
                        "transformers": summarise(b, [c for _, c, _ in records]),
                        "first_60_human_heavy": summarise([a[i] for i in human_heavy], ["heavy"] * len(human_heavy))
                        ["heavy"]}
        print(f"{name}: max |Δ log-likelihood| {max(diff):.2e} over {len(records)} test sequences", flush=True)
    return result


def stage_conversion(out: Path, name: str, draws: tuple[int, ...] = tuple(range(DRAWS))) -> dict:
    records = read_records(out / "data" / "test.fasta", SCORE_PER_CHAIN)
    chains = [c for _, c, _ in records]
    exact = load_model(iglm_dir(name))
    tokens = encode(exact, records, cls=False)
    probe = tokens[:: max(len(tokens) // 16, 1)][:16]  # attention error on 16 sequences, one at a time
    result = {"model": name, "exact": summarise(per_sequence(exact, tokens, False), chains), "favor": {}}

    def run(label: str, favor: PerformerLM) -> dict:
        t0 = time.time()
        scores = summarise(per_sequence(favor, tokens, False), chains)
        err = torch.zeros(exact.config.depth, 2, dtype=torch.float64)
        for t in probe:
            err += torch.tensor(attention_errors(exact, favor, t[None]), dtype=torch.float64)
        scores["layer_rel_error"] = (err[:, 0] / err[:, 1]).sqrt().tolist()
        print(f"{label}: acc heavy {scores['heavy']['acc']:.4f} light {scores['light']['acc']:.4f} ppl "
              f"{scores['all']['ppl']:.3f} layer error {[round(e, 3) for e in scores['layer_rel_error']]} "
              f"({time.time() - t0:.0f} s)", flush=True)
        return scores

    for m in FEATURES:
        result["favor"][f"softmax_{m}"] = [run(f"softmax m={m} draw {d}", convert_attention(exact, "favor", m,
                                                                                            "softmax", seed=d).eval())
                                           for d in draws]
    if 0 in draws:
        result["favor"]["relu_256"] = [run("relu m=256", convert_attention(exact, "favor", 256, "relu", seed=0).eval())]
    return result


def draw_from_log(log: Path) -> dict:
    """The results a ``--draws d`` run printed, for a run stopped before it wrote its JSON (per-chain accuracy,
    perplexity over both chains, layer errors)."""
    favor: dict[str, list] = {}
    for line in log.read_text().splitlines():
        if not (line.startswith("softmax m=") or line.startswith("relu m=")) or " acc heavy " not in line:
            continue
        key = f"{line.split()[0]}_{line.split()[1].removeprefix('m=')}".rstrip(":")
        heavy, light = float(line.split("acc heavy ")[1].split()[0]), float(line.split(" light ")[1].split()[0])
        ppl = float(line.split(" ppl ")[1].split()[0])
        errors = json.loads(line.split("layer error ")[1].split(" (")[0])
        favor.setdefault(key, []).append({"heavy": {"acc": heavy}, "light": {"acc": light}, "all": {"ppl": ppl},
                                          "layer_rel_error": errors, "from_log": True})
    return {"favor": favor}


def merge_conversion(out: Path) -> dict:
    """conversion.json from the per-draw files that ``--draws d`` runs write (one process per draw); a draw whose
    JSON is missing (its process stopped at the deadline) is read from its log, eval_<d>.log."""
    parts = [json.loads(f.read_text()) for f in sorted(out.glob("conversion_draw*.json"))]
    done = {f.stem.removeprefix("conversion_draw") for f in out.glob("conversion_draw*.json")}
    parts += [draw_from_log(f) for f in sorted(out.glob("eval_*.log")) if f.stem.removeprefix("eval_") not in done]
    parts.sort(key=lambda part: "exact" not in part)  # a finished draw first: it holds the exact model's scores
    merged = parts[0]
    if "exact" not in merged:  # the same SCORE_PER_CHAIN sequences as the finetuned stage, which scored it too
        finetuned = json.loads((out / "finetuned.json").read_text())
        merged.update(model=finetuned["model"], exact=finetuned["exact"])
    for part in parts[1:]:
        for key, rows in part["favor"].items():
            merged["favor"].setdefault(key, []).extend(rows)
    return merged


# ---- fine-tuning --------------------------------------------------------------------------------
def train_command(out: Path, name: str, init: Path, lr: float, batch_size: int, steps: int = STEPS[-1]) -> list[str]:
    """The pp-train command of one run (resumed from its last.ckpt when there is one)."""
    run = out / name
    last = run / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"init_from={init}", "task=clm",
           f"data.fasta_path={out / 'data' / 'train.fasta'}", "data.max_len=160", f"data.batch_size={batch_size}",
           "data.valid_frac=0.03", "data.test_frac=0.0", f"trainer.max_steps={steps}",
           "trainer.val_check_interval=500", "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=10",
           "callbacks.periodic_checkpoint.every_n_train_steps=100", "callbacks.periodic_checkpoint.save_top_k=-1",
           "callbacks.feature_redraw.every_n_steps=1000000", "callbacks.progress_bar.refresh_rate=0",
           "callbacks.progress_bar.every_seconds=60", "logger=csv", f"model.lr={lr}", "model.warmup_steps=50",
           f"output_dir={run}"]
    return cmd + ([f"ckpt_path={last}"] if last.exists() else [])


def stage_train(out: Path, batch_size: int, name: str) -> None:
    exact = load_model(iglm_dir(name))
    converted = out / f"{name}_favor{TRAIN_FEATURES}.ckpt"
    if not converted.exists():  # what pp-convert <iglm>/trained_models/<name> out.ckpt --attention favor writes
        save_checkpoint(convert_attention(exact, "favor", TRAIN_FEATURES, "softmax", seed=0), converted,
                        iglm_dir(name))
    scratch = out / "scratch_init.ckpt"
    if not scratch.exists():  # the same architecture and vocabulary, random weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fresh = PerformerLM(convert_attention(exact, "favor", TRAIN_FEATURES, "softmax", seed=0).config)
        save_checkpoint(fresh, scratch, "random init")
    # both runs side by side (one thread each), so that wherever they are stopped they have the same steps
    runs = {"finetune": (converted, 2e-4), "scratch": (scratch, 1e-3)}
    procs = []
    for name, (init, lr) in runs.items():
        if (out / name / "metrics.json").exists():
            continue
        cmd = train_command(out, name, init, lr, batch_size)
        print("+", " ".join(cmd), flush=True)
        (out / name).mkdir(parents=True, exist_ok=True)
        with open(out / name / "train.log", "a") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}))
    if any(p.wait() for p in procs):
        sys.exit("error: a training run failed; see its train.log")


def checkpoint_at(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step}.ckpt"


def stage_finetuned(out: Path, train_model: str) -> dict:
    """The fine-tuned and from-scratch runs at 100 / 300 / 1,000 steps (and the last step reached), with step 0:
    the converted model (seed-0 draw, the one fine-tuned) and the random initialisation."""
    records = read_records(out / "data" / "test.fasta", SCORE_PER_CHAIN)
    chains = [c for _, c, _ in records]

    def score(model: PerformerLM, cls: bool) -> dict:
        return summarise(per_sequence(model, encode(model, records, cls), cls), chains)

    exact = load_model(iglm_dir(train_model))
    converted = load_model(out / f"{train_model}_favor{TRAIN_FEATURES}.ckpt")
    result = {"model": train_model, "exact": score(exact, False), "converted": score(converted, False),
              "finetune": {"0": score(converted, True)}, "scratch": {"0": score(load_model(out / "scratch_init.ckpt"),
                                                                                  True)}}
    for name in ("finetune", "scratch"):
        for step in sorted({*STEPS, last_step(out / name)}):
            ckpt = checkpoint_at(out / name, step)
            if not ckpt.exists():
                print(f"{ckpt}: missing (the run stopped before step {step})", flush=True)
                continue
            result[name][str(step)] = score(load_model(ckpt), True)
            print(name, step, result[name][str(step)]["all"], flush=True)
    return result


# ---- generation ---------------------------------------------------------------------------------
def last_step(run: Path) -> int:
    return max(int(p.stem.removeprefix("step")) for p in (run / "checkpoints").glob("step*.ckpt")
               if p.stem.removeprefix("step").isdigit())


def stage_generation(out: Path, train_model: str, num_samples: int = 100) -> dict:
    """Samples of each model (prompt PROMPT) scored by the exact IgLM (13M), the judge."""
    exact = load_model(iglm_dir())
    ft = last_step(out / "finetune")
    sources = {"IgLM exact": (str(iglm_dir()), True), f"{train_model} exact": (str(iglm_dir(train_model)), True),
               f"{train_model} FAVOR+ m={TRAIN_FEATURES}": (str(out / f"{train_model}_favor{TRAIN_FEATURES}.ckpt"),
                                                           True),
               f"{train_model} FAVOR+ fine-tuned {ft} steps": (str(checkpoint_at(out / "finetune", ft)), False)}
    result = {}
    for name, (source, no_cls) in sources.items():
        fasta = out / "generation" / f"{name.replace(' ', '_').replace('=', '')}.fasta"
        fasta.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "proteinperformer.cli.generate", source, str(fasta), "--num-samples",
                        str(num_samples), "--max-length", "150", "--prompt", PROMPT, "--seed", "0",
                        *(["--no-cls"] if no_cls else [])], check=True, cwd=ROOT)
        seconds = time.time() - t0
        lines = fasta.read_text().splitlines()
        seqs = ["".join(lines[i + 1 : j]) for i, j in zip(
            [k for k, line in enumerate(lines) if line.startswith(">")],
            [k for k, line in enumerate(lines) if line.startswith(">")][1:] + [len(lines)], strict=True)]
        recs = [(f"s{i}", "heavy", "[HEAVY][HUMAN]" + s) for i, s in enumerate(seqs)]
        rows = per_sequence(exact, encode(exact, recs, False), False)
        ppl = [math.exp(r["nll"] / r["n"]) for r in rows]
        lengths = sorted(len(s) for s in seqs)
        result[name] = {"samples": len(seqs), "exact_iglm_ppl_mean": sum(ppl) / len(ppl),
                        "exact_iglm_ppl_median": sorted(ppl)[len(ppl) // 2],
                        "exact_iglm_ppl_pooled": math.exp(sum(r["nll"] for r in rows) / sum(r["n"] for r in rows)),
                        "length_median": lengths[len(lengths) // 2], "length_min": lengths[0],
                        "length_max": lengths[-1], "generate_seconds": round(seconds, 1), "source": source}
        print(name, result[name], flush=True)
    return result


# ---- report -------------------------------------------------------------------------------------
def _cells(rows: list[dict]) -> str:
    """heavy acc. | light acc. | ppl (both chains), as mean ± half-range over rows (projection draws)."""
    cells = []
    for chain, key, scale, fmt in (("heavy", "acc", 100, "{:.2f}%"), ("light", "acc", 100, "{:.2f}%"),
                                   ("all", "ppl", 1, "{:.3f}")):
        vals = [scale * r[chain][key] for r in rows]
        mean = sum(vals) / len(vals)
        spread = f" ± {(max(vals) - min(vals)) / 2:.{2 if key == 'acc' else 3}f}" if len(rows) > 1 else ""
        cells.append(fmt.format(mean) + spread)
    return " | ".join(cells)


def stage_report(out: Path, results: Path) -> None:
    data = {k: json.loads((out / f"{k}.json").read_text()) for k in ("data", "exactness", "conversion", "finetuned",
                                                                      "generation") if (out / f"{k}.json").exists()}
    results.mkdir(parents=True, exist_ok=True)
    (results / "fig5_real.json").write_text(json.dumps(data, indent=2) + "\n")
    conv, ft = data["conversion"], data["finetuned"]
    head = "| heavy acc. | light acc. | ppl (both) |"
    lines = [f"| {conv['model']}, held-out {head} attention error per layer |", "|---|---:|---:|---:|---|",
             f"| exact attention | {_cells([conv['exact']])} | 0 |"]
    for key, rows in conv["favor"].items():
        kernel, m = key.split("_")
        err = [sum(r["layer_rel_error"][i] for r in rows) / len(rows) for i in range(len(rows[0]["layer_rel_error"]))]
        lines.append(f"| FAVOR+ {kernel}, m={m}" + (f" ({len(rows)} draws)" if len(rows) > 1 else "")
                     + f" | {_cells(rows)} | {' / '.join(f'{x:.3f}' for x in err)} |")
    lines += ["", f"| {ft['model']}, held-out | steps {head}", "|---|---:|---:|---:|---:|",
              f"| exact attention | – | {_cells([ft['exact']])} |",
              f"| FAVOR+ softmax m={TRAIN_FEATURES} (the draw fine-tuned), IgLM framing | 0 | "
              f"{_cells([ft['converted']])} |"]
    for name, label in (("finetune", f"FAVOR+ m={TRAIN_FEATURES}, fine-tuned from {ft['model']}"),
                        ("scratch", f"FAVOR+ m={TRAIN_FEATURES}, same size, from scratch")):
        for step, sc in sorted(ft[name].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {label} | {step} | {_cells([sc])} |")
    if "generation" in data:
        lines += ["", "| samples (prompt [HEAVY][HUMAN]EVQ, 100 each) | exact IgLM ppl, mean | median | length "
                  "median (min-max) |", "|---|---:|---:|---|"]
        for name, g in data["generation"].items():
            lines.append(f"| {name} | {g['exact_iglm_ppl_mean']:.3f} | {g['exact_iglm_ppl_median']:.3f} | "
                         f"{g['length_median']} ({g['length_min']}-{g['length_max']}) |")
    (results / "fig5_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, chain in zip(axes, CHAIN_TAGS, strict=True):
        ax.axhline(100 * ft["exact"][chain]["acc"], color="k", ls="--", label=f"{ft['model']}, exact attention")
        for name, style, label in (("finetune", "o-", f"{ft['model']} → FAVOR+ (m={TRAIN_FEATURES}), fine-tuned"),
                                   ("scratch", "s-", "FAVOR+ from scratch, same size")):
            steps = sorted(int(k) for k in ft[name])
            ax.plot(steps, [100 * ft[name][str(k)][chain]["acc"] for k in steps], style, label=label)
        style_steps_axis(ax, chain, "fine-tuning steps")
    axes[0].set_ylabel("next-residue accuracy (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{ft['model']} (GPT-2 antibody LM) as a Performer: the paper's Fig. 5 on real weights")
    fig.tight_layout()
    fig.savefig(results / "fig5_real.png", dpi=120)
    print(f"wrote {results / 'fig5_real.png'}")


def style_steps_axis(ax, chain: str, xlabel: str) -> None:
    """One panel of a Fig. 5 plot: fine-tuning steps 0 / 100 / 300 / 1,000 on a symlog axis, titled by chain type."""
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xticks([0, 100, 300, 1000])
    ax.set_xticklabels(["0", "100", "300", "1000"])
    ax.set_title(f"{chain} chains (held-out clusters)")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--antibodies", type=Path,
                        default=Path(os.environ.get("PP_SHARED_DATA", ROOT.parent / "shared" / "data"))
                        / "antibodies" / "antibodies.csv")
    parser.add_argument("--batch-size", type=int, default=4, help="fine-tuning batch (sequences)")
    parser.add_argument("--train-model", default="IgLM-S", choices=("IgLM", "IgLM-S"),
                        help="the model fine-tuned (IgLM-S: 1,000 steps of IgLM do not fit 2 shared CPU cores)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where the report stage writes")
    parser.add_argument("--draws", type=int, nargs="+", default=None, metavar="D",
                        help="conversion stage: compute only these projection draws (one process per draw, run side "
                             "by side; a later run without --draws merges their conversion_draw<D>.json)")
    args = parser.parse_args()
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for stage in args.stages:
        print(f"== {stage}", flush=True)
        if stage == "data":
            print(cached(out / "data.json", stage_data, out, args.antibodies))
        elif stage == "exactness":
            cached(out / "exactness.json", stage_exactness, out)
        elif stage == "conversion":
            if args.draws is not None:  # one process per projection draw (merged by a run without --draws)
                cached(out / f"conversion_draw{','.join(map(str, args.draws))}.json", stage_conversion, out,
                       args.train_model, tuple(args.draws))
            elif list(out.glob("conversion_draw*.json")):
                cached(out / "conversion.json", merge_conversion, out)
            else:
                cached(out / "conversion.json", stage_conversion, out, args.train_model)
        elif stage == "train":
            stage_train(out, args.batch_size, args.train_model)
        elif stage == "finetuned":
            cached(out / "finetuned.json", stage_finetuned, out, args.train_model)
        elif stage == "generation":
            cached(out / "generation.json", stage_generation, out, args.train_model)
        else:
            stage_report(out, args.results)


if __name__ == "__main__":
    main()
