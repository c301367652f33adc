"""A checkpoint's model card, every evaluation in one run (the ``pp-evaluate CKPT --out DIR`` command).

Runs, with the data shipped in ``data/`` by default (every path is an option):

1. masked-residue accuracy and perplexity on the valid and test splits of ``--fasta`` (accession-hash splits,
   with the checkpoint's own training fractions and seed when it records them, else the training defaults 0.05 /
   0.05 / 0, each overridable with ``--valid-frac`` / ``--test-frac`` / ``--split-seed``; the card says which, so
   a checkpoint trained on the same FASTA never saw these proteins; 15% of residues, all replaced by ``<mask>``)
   against the unigram baseline (train-split frequencies of the residue letters, scored on every residue of the
   split: :mod:`proteinperformer.data.unigram`);
2. the probes of ``pp-probe`` against their baselines: SS3 (Q3), location and fold class (accuracy, macro-F1),
   GO molecular function (CAFA F-max, micro-AUPR);
3. attention vs BLOSUM62 (``pp-attention-blosum``): Vig et al.'s binarised method (with the number of surviving
   heads) and the attention-weighted variant, each beside a randomly initialised model of the same shape;
4. contact precision (``pp-contacts``): long- and medium-range precision at L and L/5 against the random-init
   null and the background rate;
5. zero-shot variant effects (``pp-score``): Spearman ρ of the masked-marginal scores on the TEM-1 β-lactamase
   scan (``data/dms/``) against the random-init null, BLOSUM62 and the unigram log-ratio, beside ESM-1v's
   published 0.725 (:mod:`proteinperformer.evaluation.dms`).

Writes ``DIR/card.json`` (every number), ``DIR/card.md`` (the model-card table), ``DIR/card.png`` (each task's
headline metric, model vs its best baseline) and the per-task JSON/PNG files of the commands above under
``DIR/probes``, ``DIR/blosum``, ``DIR/contacts``. ``--update-readme FILE`` replaces the part of FILE between
``<!-- pp-evaluate:begin -->`` and ``<!-- pp-evaluate:end -->`` with the card (how ``weights/README.md``
is made). ``--skip`` leaves sections out; the ``--*-max-train`` options bound the probes' CPU time (defaults:
about 10 minutes on 2 CPU cores for the 2.7M-parameter reference checkpoint).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from pathlib import Path

import torch

from proteinperformer.analysis import blosum_report, contacts_report
from proteinperformer.checkpoints import CheckpointError, load_model, read_torch
from proteinperformer.data.datamodule import ProteinDataModule
from proteinperformer.data.unigram import unigram_baseline, unigram_description
from proteinperformer.evaluation.dms import PUBLISHED, TEM1_CSV, tem1_rho
from proteinperformer.evaluation.probe import probe_files, read_tables
from proteinperformer.files import resolve_path, save_figure_atomic, write_json_atomic, write_text_atomic
from proteinperformer.model.precision import check_inference_precision, inference_autocast, resolve_device
from proteinperformer.options import CARD_BEGIN, CARD_END, PROBES
from proteinperformer.progress import track
from proteinperformer.tokenizer import Alphabet
from proteinperformer.training.scoring import score_batches

BASELINE_NAMES = {"onehot": "one-hot", "composition": "composition", "kmer3": "3-mer spectrum",
                  "naive": "naive (term frequency)", "nn_kmer3": "3-mer nearest neighbours"}
BEGIN, END = CARD_BEGIN, CARD_END
# the accession-hash split of conf/data/fasta.yaml, used for checkpoints that do not record their own
TRAINING_SPLIT = {"valid_frac": 0.05, "test_frac": 0.05, "split_seed": 0}


# ---- masked-residue accuracy and perplexity -----------------------------------------------------
def masked_lm_scores(
    model: torch.nn.Module,
    fasta: str | Path,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    split_seed: int = 0,
    max_len: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    max_sequences: int | None = None,
) -> dict:
    """Accuracy and perplexity of the masked residues of the valid and test splits of ``fasta`` (of the first
    ``max_sequences`` of each split, in whole batches, when given: ``n_sequences`` says how many were scored)
    (:func:`~proteinperformer.training.scoring.score_batches` on the data module's evaluation batches: 15% of
    residues, every one replaced by ``<mask>``, fixed per example; sequences cropped to ``max_len`` tokens,
    deterministically), beside the unigram baseline of each split
    (:func:`~proteinperformer.data.unigram.unigram_baseline`: train-split frequencies, every residue of the split):
    ``{split: {"model": {"accuracy", "perplexity"}, "unigram": {"accuracy", "perplexity", "residues"},
    "n_sequences", "n_masked"}, "unigram": its definition, "unigram_most_frequent", "n_train_sequences"}``."""
    dm = ProteinDataModule.from_hparams(fasta_path=str(fasta), task="mlm", max_len=max_len, batch_size=batch_size,
                                        valid_frac=valid_frac, test_frac=test_frac, split_seed=split_seed, seed=seed)
    dm.setup()
    alphabet = dm.alphabet
    out = {}
    for split, loader in (("valid", dm.val_dataloader()), ("test", dm.test_dataloader())):
        n = len(dm.splits[split]) if max_sequences is None else min(max_sequences, len(dm.splits[split]))
        batches = itertools.islice(loader, math.ceil(n / batch_size))
        scores = score_batches(model, track(batches, desc=f"masked LM ({split})", unit="batch", leave=False,
                                            total=math.ceil(n / batch_size)), alphabet)
        if scores["residues"] == 0:
            raise ValueError(f"{fasta}: the {split} split has no masked residue (valid_frac={valid_frac}, "
                             f"test_frac={test_frac}); use a larger FASTA or larger fractions")
        unigram = unigram_baseline(dm.splits["train"], dm.splits[split], alphabet)
        out[split] = {"model": {"accuracy": scores["accuracy"], "perplexity": scores["perplexity"]},
                      "unigram": {k: unigram[k] for k in ("accuracy", "perplexity", "residues")},
                      "n_sequences": min(math.ceil(n / batch_size) * batch_size, len(dm.splits[split])),
                      "n_masked": scores["residues"]}
    out["unigram"] = unigram_description(alphabet, "train-split", "every residue of the split")
    out["unigram_most_frequent"] = unigram["most_frequent"]
    out["n_train_sequences"] = len(dm.splits["train"])
    return out


# ---- the card -----------------------------------------------------------------------------------
def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def card_rows(card: dict) -> list[tuple[str, str, str, str]]:
    """(evaluation, metric, this model, baselines / null) rows of the model-card table."""
    rows = []
    s = card["sections"]
    if "mlm" in s:
        for split in ("valid", "test"):
            m = s["mlm"][split]
            rows.append((f"masked residues, {split} split ({m['n_masked']:,} residues of {m['n_sequences']} proteins)",
                         "accuracy / perplexity",
                         f"**{100 * m['model']['accuracy']:.2f}% / {m['model']['perplexity']:.2f}**",
                         f"unigram {100 * m['unigram']['accuracy']:.2f}% / {m['unigram']['perplexity']:.2f} "
                         f"({s['mlm']['unigram']})"))
    probe_metrics = {"ss3": ("Q3", ("q3",)), "location": ("accuracy / macro-F1", ("accuracy", "macro_f1")),
                     "fold_class": ("accuracy / macro-F1", ("accuracy", "macro_f1")),
                     "go_mf": ("F-max / micro-AUPR", ("fmax", "aupr"))}
    titles = {"ss3": "secondary structure (SS3)", "location": "subcellular location (10 classes)",
              "fold_class": "structural class (α / β / α-β)", "go_mf": "GO molecular function"}
    for task, (metric, keys) in probe_metrics.items():
        if task not in s:
            continue
        rep = s[task]
        res = rep["results"]
        val = lambda r, keys=keys: " / ".join(_f(r[k]) for k in keys)  # noqa: E731
        size = (f"{rep['n_terms']} terms, {rep['n_train_proteins']} train / {rep['n_evaluated_proteins']} valid "
                "proteins" if task == "go_mf" else
                f"{rep['n_train_proteins']} train / {rep['n_test_proteins']} valid proteins")
        baselines = "; ".join(f"{BASELINE_NAMES[k]} {val(r)}" for k, r in res.items() if k != "embedding")
        rows.append((f"{titles[task]} ({size})", metric, f"**{val(res['embedding'])}**", baselines))
    if "blosum" in s:
        b = s["blosum"]["methods"]
        v = b["vig"]
        rows.append((f"attention vs BLOSUM62, Vig et al. method ({s['blosum']['n_sequences']} proteins)",
                     "Pearson r (heads kept: ≥ 100 edges of weight ≥ 0.3)",
                     f"**{_f(v['model']['overall']['BLOSUM62'])}** ({v['model']['n_heads_kept']}/"
                     f"{v['model']['n_heads']} heads)",
                     f"random-init null {_f(v['null_random_init']['overall']['BLOSUM62'])} "
                     f"({v['null_random_init']['n_heads_kept']}/{v['null_random_init']['n_heads']} heads)"))
        w = b["weighted"]
        rows.append(("attention vs BLOSUM62, attention-weighted variant", "Pearson r (all heads)",
                     f"**{_f(w['model']['overall']['BLOSUM62'])}**",
                     f"random-init null {_f(w['null_random_init']['overall']['BLOSUM62'])}"))
    if "contacts" in s:
        c = s["contacts"]
        for rng in ("long", "medium"):
            m, n = c["model"]["mean"][rng], c["null_random_init"]["mean"][rng]
            rows.append((f"contacts, {rng} range ({c['n_test']} test chains, {c['contact_definition']})",
                         "precision top-L / L/5", f"**{_f(m['L'])} / {_f(m['L/5'])}**",
                         f"random-init null {_f(n['L'])} / {_f(n['L/5'])}; background {_f(m['background'])}"))
    if "dms" in s:
        r = s["dms"]["rho"]
        rows.append((f"zero-shot variant effects, TEM-1 β-lactamase scan ({s['dms']['n']:,} substitutions)",
                     "Spearman ρ, masked marginals", f"**{_f(r['model masked-marginals'])}**",
                     f"random-init null {_f(r['random init masked-marginals'])}; BLOSUM62 {_f(r['BLOSUM62(wt, mt)'])}; "
                     f"unigram {_f(r['unigram log f(mt)/f(wt)'])}; ESM-1v (published) "
                     f"{PUBLISHED['ESM-1v (zero-shot, 5 models)']:.3f}"))
    return rows


def card_markdown(card: dict) -> str:
    """The model-card section: header facts, the table, how it was made."""
    m = card["model"]
    cfg = m["config"]
    lines = [
        f"## Evaluation (`pp-evaluate`, {card['wall_seconds'] / 60:.1f} min on {card['host']['cpus']} CPU cores)",
        "",
        f"Checkpoint `{Path(card['checkpoint']).name}`: {m['parameters']:,} parameters, dim {cfg['dim']}, depth "
        f"{cfg['depth']}, {cfg['heads']} heads, {cfg['attention']} attention"
        + (f" ({cfg['kernel']} kernel, "
           + (f"m = {cfg['num_features']})" if cfg["kernel"] == "softmax" or cfg.get("use_projection", True)
              else "no projection)") if cfg["attention"] == "favor" else "")
        + (f", step {m['global_step']:,}" if m.get("global_step") is not None else "") + ".",
        "",
        "| evaluation | metric | this model | baselines / null |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in card_rows(card)]
    s = card["sections"]
    notes = ["", "Probes are logistic regressions on final-layer mean (per-residue for SS3) embeddings, the "
             "baselines the same probe on sequence-only features (`pp-probe`); the GO-MF vocabulary comes from the "
             "whole training file."]
    if "go_mf" in s:
        sk = s["go_mf"]["skipped"]
        notes.append(f"GO-MF: {sk['test_proteins_without_vocabulary_term']} valid proteins without a vocabulary term "
                     f"were skipped, {sk['test_annotations_outside_vocabulary']:,} valid annotations fall outside "
                     f"the vocabulary.")
    if "blosum" in s:
        v = s["blosum"]["methods"]["vig"]["model"]
        if v["n_heads_kept"] < 2:
            notes.append(f"Vig et al.'s statistic is undefined here: only {v['n_heads_kept']} of {v['n_heads']} heads "
                         f"have ≥ 100 attention weights ≥ 0.3 (largest weight seen "
                         f"{_f(v.get('max_attention_weight'), 2)}; FAVOR+ spreads attention thinly), and the "
                         "threshold is not lowered.")
    notes += ["", "Data: " + "; ".join(f"{k} `{v}`" for k, v in card["data"].items()) + ".", "", "Command:", "",
              "```bash", card["command"], "```"]
    return "\n".join(lines + notes) + "\n"


def plot_card(card: dict, path: Path) -> None:
    """One bar group per task: the model's headline metric beside its baselines / null."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    s = card["sections"]
    if "mlm" in s:
        groups.append(("masked acc. (valid)", {"model": s["mlm"]["valid"]["model"]["accuracy"],
                                                "unigram": s["mlm"]["valid"]["unigram"]["accuracy"]}))
    for task, key in (("ss3", "q3"), ("location", "macro_f1"), ("fold_class", "macro_f1"), ("go_mf", "fmax")):
        if task in s:
            groups.append((f"{task} {key}", {k: r[key] for k, r in s[task]["results"].items()}))
    if "contacts" in s:
        c = s["contacts"]
        groups.append(("long P@L", {"model": c["model"]["mean"]["long"]["L"],
                                    "null": c["null_random_init"]["mean"]["long"]["L"],
                                    "background": c["model"]["mean"]["long"]["background"]}))
    if "dms" in s:
        r = s["dms"]["rho"]
        groups.append(("TEM-1 ρ", {"model": r["model masked-marginals"], "null": r["random init masked-marginals"],
                                   "BLOSUM62": r["BLOSUM62(wt, mt)"], "unigram": r["unigram log f(mt)/f(wt)"]}))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(2.6 * max(len(groups), 1), 3.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], groups, strict=False):
        names = list(values)
        colors = ["tab:blue" if n in ("embedding", "model") else "tab:gray" for n in names]
        ax.bar(range(len(names)), [values[n] for n in names], color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(Path(card["checkpoint"]).name, fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def update_readme(readme: Path, markdown: str) -> None:
    """Replace the text between the pp-evaluate markers of ``readme`` with ``markdown`` (temp file + rename)."""
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme}: needs exactly one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    write_text_atomic(readme, f"{head}{BEGIN}\n{markdown}{END}{tail}")


def _write_json(obj: dict, path: Path) -> None:
    def safe(x):
        if isinstance(x, dict):
            return {k: safe(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [safe(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    write_json_atomic(path, safe(obj))


# ---- the run ------------------------------------------------------------------------------------
def training_record(path: Path) -> dict:
    """What a pp-train checkpoint says about its own training: ``global_step`` and the accession-hash split
    (``valid_frac``, ``test_frac``, ``split_seed``, from the data module's saved hyper-parameters); empty for
    files without them (an ESM-2 import, a checkpoint from before the data module saved them)."""
    try:
        ckpt = read_torch(path)
    except CheckpointError:  # a directory (Hugging Face ESM) or a file with no training record
        return {}
    if not isinstance(ckpt, dict):
        return {}
    data = ckpt.get("datamodule_hyper_parameters") or {}
    record = {"global_step": ckpt.get("global_step")}
    if data.get("store_path") is None and all(k in data for k in ("valid_frac", "test_frac", "split_seed")):
        record["split"] = {k: data[k] for k in ("valid_frac", "test_frac", "split_seed")}
    return record


def resolve_split(args: argparse.Namespace, record: dict) -> tuple[dict, str]:
    """The split to score: each of --valid-frac / --test-frac / --split-seed as given, else the checkpoint's own
    training split, else the training defaults (``conf/data/fasta.yaml``); returns (split, where it came from)."""
    given = {k: getattr(args, k) for k in ("valid_frac", "test_frac", "split_seed")}
    own = record.get("split")
    base, source = (own, "the checkpoint's training config") if own else (TRAINING_SPLIT, "the training defaults")
    split = {k: base[k] if v is None else v for k, v in given.items()}
    if any(v is not None for v in given.values()):
        source = "the command line" + (f" over {source}" if any(v is None for v in given.values()) else "")
    return split, source


def evaluate(args: argparse.Namespace) -> dict:
    """Run every section not in ``args.skip``; write card.json / card.md / card.png under ``args.out``."""
    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip)
    paths = {task: (resolve_path(getattr(args, f"{task}_train")), resolve_path(getattr(args, f"{task}_valid")))
             for task in PROBES}
    for task, (train, valid) in paths.items():  # bad data fails before any model work
        if task not in skip:
            read_tables(train, valid, max_train=getattr(args, f"{task}_max_train"), seed=args.seed)
    device = resolve_device(args.device)
    precision = getattr(args, "precision", "32")
    check_inference_precision(precision, device)
    model = load_model(args.checkpoint, device, attention=getattr(args, "attention", None),
                       num_features=getattr(args, "num_features", None), kernel=getattr(args, "kernel", None),
                       features=getattr(args, "features", None))
    record = training_record(args.checkpoint)
    card = {
        "checkpoint": str(args.checkpoint),
        "model": {"config": model.config.to_dict(), "parameters": model.num_parameters(),
                  "global_step": record.get("global_step")},
        "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "precision": precision,
        "data": {},
        "sections": {},
        "seconds": {},
        "command": args.command,
    }

    def stage(name: str) -> float:
        print(f"\n== {name} ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
        return time.perf_counter()

    if "mlm" not in skip:
        t = stage("masked residues")
        if list(getattr(model, "alphabet", Alphabet()).all_toks) != Alphabet().all_toks:
            card["sections"]["mlm_skipped"] = "the model's alphabet is not this package's (an import): not scored"
        else:
            fasta = resolve_path(args.fasta)
            card["data"]["masked residues"] = str(args.fasta)
            split, source = resolve_split(args, record)
            print(f"scoring the valid and test splits of {args.fasta} (valid_frac={split['valid_frac']}, "
                  f"test_frac={split['test_frac']}, split_seed={split['split_seed']}, from {source})")
            card["data"]["split"] = {**split, "from": source}
            with inference_autocast(precision, device):
                card["sections"]["mlm"] = masked_lm_scores(model, fasta, split["valid_frac"], split["test_frac"],
                                                           split["split_seed"],
                                                           args.max_len, args.batch_size, args.seed,
                                                           getattr(args, "max_sequences", None))
            print(f"unigram baseline: {card['sections']['mlm']['unigram']}")
            for split in ("valid", "test"):
                m = card["sections"]["mlm"][split]
                print(f"{split}: model {100 * m['model']['accuracy']:.2f}% / {m['model']['perplexity']:.2f}, "
                      f"unigram {100 * m['unigram']['accuracy']:.2f}% / {m['unigram']['perplexity']:.2f}")
        card["seconds"]["mlm"] = round(time.perf_counter() - t, 1)
    for task, (train, valid) in paths.items():
        if task in skip:
            continue
        t = stage(f"probe {task}")
        (out / "probes").mkdir(exist_ok=True)
        card["data"][task] = f"{getattr(args, f'{task}_train')}, {getattr(args, f'{task}_valid')}"
        report = probe_files(model, train, valid, out / "probes" / f"{task}.json",
                             max_train=getattr(args, f"{task}_max_train"), seed=args.seed,
                             toks_per_batch=args.toks_per_batch, precision=precision)
        for r in report["results"].values():  # curves and confusion matrices stay in probes/<task>.json
            for key in ("curve", "pr_curve", "confusion"):
                r.pop(key, None)
        card["sections"][task] = report
        card["seconds"][task] = round(time.perf_counter() - t, 1)
    if "blosum" not in skip:
        t = stage("attention vs BLOSUM62")
        card["data"]["BLOSUM62"] = f"{args.blosum_fasta} ({args.blosum_n_seqs} proteins)"
        res = blosum_report.run(str(args.checkpoint), str(resolve_path(args.blosum_fasta)), args.blosum_n_seqs,
                                out / "blosum", ["BLOSUM62"], args.blosum_max_len, args.seed,
                                precision=precision, device=device)
        for part in res["methods"].values():
            for r in part.values():
                r.pop("edges_per_head", None)
        card["sections"]["blosum"] = {k: res[k] for k in ("n_sequences", "n_residues", "max_len", "methods")}
        card["seconds"]["blosum"] = round(time.perf_counter() - t, 1)
    if "contacts" not in skip:
        t = stage("contacts")
        card["data"]["contacts"] = str(args.structures)
        res = contacts_report.run(str(args.checkpoint), str(resolve_path(args.structures)),
                                  args.contact_train_chains, out / "contacts", max_len=args.contact_max_len,
                                  seed=args.seed, precision=precision, device=device)
        card["sections"]["contacts"] = {k: res[k] for k in ("contact_definition", "n_train", "n_test")} | {
            part: {"mean": res[part]["mean"]} for part in ("model", "null_random_init")}
        card["seconds"]["contacts"] = round(time.perf_counter() - t, 1)
    if "dms" not in skip:
        t = stage("zero-shot variant effects (TEM-1 scan)")
        card["data"]["variant effects"] = f"{TEM1_CSV} (fitness at 2,500 µg/mL ampicillin)"
        card["sections"]["dms"] = tem1_rho(model, TEM1_CSV, null_seed=args.seed, precision=precision)
        card["seconds"]["dms"] = round(time.perf_counter() - t, 1)
    card["wall_seconds"] = round(time.perf_counter() - start, 1)
    markdown = card_markdown(card)
    _write_json(card, out / "card.json")
    (out / "card.md").write_text(markdown)
    plot_card(card, out / "card.png")
    if args.update_readme is not None:
        update_readme(args.update_readme, markdown)
    print("\n" + markdown)
    print(f"written: {out / 'card.json'}, {out / 'card.md'}, {out / 'card.png'} ({card['wall_seconds'] / 60:.1f} min)")
    return card
