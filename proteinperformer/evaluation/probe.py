"""Linear probes on embeddings (scikit-learn), each scored against two sequence-only baselines.

Tasks (CSV formats of ``data/probes/``, see its README; the task is read off the columns):

- ``ss3`` (columns id, sequence, ss3, mask): per-residue 3-state secondary structure (H/E/C). Logistic
  regression on per-residue embeddings; residues with mask 0 (unresolved) are left out of training and
  metrics. Metric: Q3 (residue accuracy) and per-class recall. Baselines: ``onehot`` = one-hot residues in
  a ±7 window (15 x 21 features, zeros past the ends); ``composition`` = amino-acid composition of the
  same window (21 fractions summing to 1).
- ``location`` (columns id, sequence, location): per-protein subcellular localisation (10 classes).
  Logistic regression on mean embeddings. Metrics: accuracy, macro-F1 and per-class F1. Baselines:
  ``onehot`` = one-hot of the 30 N-terminal and 30 C-terminal residues (where targeting signals sit; a
  mean-pooled one-hot would just be the composition); ``composition`` = amino-acid composition (21
  fractions summing to 1).
- ``fold_class`` (columns id, sequence, fold_class): per-protein structural class (mainly_alpha / mainly_beta /
  alpha_beta). Same probe, baselines and metrics as ``location``; macro-F1 is the main metric (the classes are
  unbalanced) and picks C.
- ``go_mf`` (columns id, sequence, go): multi-label GO molecular-function prediction scored with CAFA's
  protein-centric F-max and micro-AUPR against the naive, composition, 3-mer and nearest-neighbour baselines
  (:mod:`proteinperformer.evaluation.go`). The vocabulary is taken from the whole ``--train`` file, before
  ``--max-train`` sampling, so numbers stay comparable across sample sizes.

Every label of a valid/test table must occur in the training table (an error names file, line and column);
the report counts what is skipped (unannotated GO proteins, GO terms outside the vocabulary).

The 21 residue classes are the 20 standard amino acids plus one for X/B/Z/U/O. Every feature set goes
through the same ``StandardScaler -> LogisticRegression`` pipeline. ``--max-train N`` samples N training
proteins (seeded) for CPU speed. ``--C`` with several values picks C on ``--valid`` and reports ``--test``;
without ``--test`` the valid set is the test set and a single C (default 1.0) is used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from proteinperformer.evaluation.baselines import composition, terminal_onehot, window_composition, window_onehot
from proteinperformer.evaluation.go import check_go_column, plot_go, run_go_probe, split_terms, term_vocabulary
from proteinperformer.files import read_csv, save_figure_atomic, write_json_atomic
from proteinperformer.progress import track
from proteinperformer.tokenizer import Alphabet, TokenizationError

SS3_CLASSES = ("H", "E", "C")
TASK_COLUMNS = {"ss3": ("id", "sequence", "ss3", "mask"), "location": ("id", "sequence", "location"),
                "fold_class": ("id", "sequence", "fold_class"), "go_mf": ("id", "sequence", "go")}
PER_PROTEIN = ("location", "fold_class")  # single-label per-protein tasks: the label column is the task name
FEATURE_SETS = ("embedding", "onehot", "composition")

class ProbeDataError(ValueError):
    """A probe CSV is malformed; the message names the file, line and id."""


# ---- data ---------------------------------------------------------------------------------------
def read_probe_csv(path: str | Path) -> tuple[str, pd.DataFrame]:
    """Read and validate a probe CSV; returns (task, table). Raises :class:`ProbeDataError` naming
    ``file:line`` and the id for bad sequences, label/mask length mismatches, unknown letters or
    duplicate ids."""
    path = Path(path)
    try:
        df = read_csv(path, "probe CSV (id, sequence, label columns)", dtype=str, keep_default_na=False)
    except ValueError as err:
        raise ProbeDataError(str(err)) from None
    tasks = [t for t, cols in TASK_COLUMNS.items() if set(cols) <= set(df.columns)]
    if not tasks:
        raise ProbeDataError(f"{path}: columns {list(df.columns)} fit no probe task; expected {TASK_COLUMNS}")
    if len(df) == 0:
        raise ProbeDataError(f"{path}: no rows after the header (an empty split)")
    task = tasks[0]
    alphabet = Alphabet()
    seen: dict[str, int] = {}
    for i, row in enumerate(df.itertuples(index=False)):
        where = f"{path}:{i + 2}: id {row.id!r}"  # line 1 is the header
        if not row.id or not row.sequence:
            raise ProbeDataError(f"{where}: empty id or sequence")
        if row.id in seen:
            raise ProbeDataError(f"{where}: duplicate id (first at line {seen[row.id]})")
        seen[row.id] = i + 2
        try:
            alphabet.encode(row.sequence, row.id)
        except TokenizationError as err:
            raise ProbeDataError(f"{where}: {err}") from None
        if task == "ss3":
            if not len(row.sequence) == len(row.ss3) == len(row.mask):
                raise ProbeDataError(f"{where}: lengths differ: sequence {len(row.sequence)}, ss3 {len(row.ss3)}, "
                                     f"mask {len(row.mask)}")
            if bad := set(row.ss3) - set(SS3_CLASSES):
                raise ProbeDataError(f"{where}: ss3 labels {sorted(bad)} not in {SS3_CLASSES}")
            if bad := set(row.mask) - {"0", "1"}:
                raise ProbeDataError(f"{where}: mask characters {sorted(bad)} not 0/1")
        elif task in PER_PROTEIN and not getattr(row, task):
            raise ProbeDataError(f"{where}: column {task!r}: empty label")
    if task == "go_mf":
        try:
            check_go_column(df, path)
        except ValueError as err:
            raise ProbeDataError(str(err)) from None
    return task, df


def check_labels_seen(task: str, train: pd.DataFrame, other: pd.DataFrame, path: str | Path) -> None:
    """Raise :class:`ProbeDataError` naming ``file:line``, id and column for a label of ``other`` (a valid/test
    table read from ``path``) that no training protein has (a per-protein probe could never predict it)."""
    if task not in PER_PROTEIN:
        return
    seen = set(getattr(train, task))
    for i, (pid, label) in enumerate(zip(other.id, getattr(other, task), strict=True)):
        if label not in seen:
            raise ProbeDataError(f"{path}:{i + 2}: id {pid!r}: column {task!r}: label {label!r} never occurs in the "
                                 f"training table (labels there: {sorted(seen)})")


# ---- metrics ------------------------------------------------------------------------------------
def ss3_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict:
    """Q3 (residue accuracy) and per-class recall over the given (resolved) residues."""
    recall = recall_score(y_true, y_pred, labels=list(SS3_CLASSES), average=None, zero_division=0)
    return {"q3": float(accuracy_score(y_true, y_pred)), "n": len(y_true),
            "per_class_recall": dict(zip(SS3_CLASSES, map(float, recall), strict=True))}


def location_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over ``classes`` and per-class F1."""
    f1 = f1_score(y_true, y_pred, labels=list(classes), average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_f1": float(np.mean(f1)), "n": len(y_true),
            "per_class_f1": dict(zip(classes, map(float, f1), strict=True))}


# ---- features per task --------------------------------------------------------------------------
def features(task: str, df: pd.DataFrame, reps: dict | None, layer: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feature matrices for each feature set and the labels: ss3 -> one row per resolved residue
    ([N_res, *]), location -> one row per protein ([N, *]). ``reps`` from :func:`proteinperformer.inference.embed.embed`
    (None skips the embedding set)."""
    sets: dict[str, list[np.ndarray]] = {name: [] for name in FEATURE_SETS if reps is not None or name != "embedding"}
    labels = []
    for row in df.itertuples(index=False):
        if task == "ss3":
            keep = np.frombuffer(row.mask.encode(), dtype=np.uint8) == ord("1")
            if reps is not None:
                sets["embedding"].append(reps[row.id]["per_tok"][layer].numpy()[keep])
            sets["onehot"].append(window_onehot(row.sequence)[keep])
            sets["composition"].append(window_composition(row.sequence)[keep])
            labels.append(np.array(list(row.ss3))[keep])
        else:
            if reps is not None:
                sets["embedding"].append(reps[row.id]["mean"][layer].numpy()[None])
            sets["onehot"].append(terminal_onehot(row.sequence)[None])
            sets["composition"].append(composition(row.sequence)[None])
            labels.append(np.array([getattr(row, task)]))
    return {k: np.concatenate(v) for k, v in sets.items()}, np.concatenate(labels)


def make_probe(C: float = 1.0, seed: int = 0) -> Pipeline:
    """The probe used for every feature set: standardise, then multinomial logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))


def score(task: str, y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    return ss3_metrics(y_true, y_pred) if task == "ss3" else location_metrics(y_true, y_pred, classes)


MAIN_METRIC = {"ss3": "q3", "location": "accuracy", "fold_class": "macro_f1", "go_mf": "fmax"}


# ---- the run ------------------------------------------------------------------------------------
def run_probe(
    model,
    task: str,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame | None = None,
    layer: int = -1,
    Cs: Sequence[float] = (1.0,),
    seed: int = 0,
    toks_per_batch: int = 4096,
    go_vocabulary: Sequence[str] | None = None,
    precision: str = "32",
) -> dict:
    """Fit the probe on ``train`` for the embedding and both baselines, score on ``test`` (default ``valid``).

    With several ``Cs`` the best C per feature set is chosen on ``valid`` (then ``test`` must be given).
    Returns a JSON-ready dict with per-feature-set metrics, predictions' confusion matrices and timing.
    ``go_mf`` scores the terms of ``go_vocabulary`` (default: terms of ≥ 20 proteins of ``train``) with
    :func:`proteinperformer.evaluation.go.run_go_probe`.
    """
    from proteinperformer.inference.embed import embed

    if len(Cs) > 1 and test is None:
        raise ValueError("choosing C among several values needs a --test set separate from --valid")
    splits = {"train": train, "valid": valid} if test is not None and len(Cs) > 1 else {"train": train}
    splits["test"] = valid if test is None else test
    include = ("per_tok",) if task == "ss3" else ("mean",)
    data, n_res, seconds = {}, 0, 0.0
    for name, df in splits.items():
        start = time.perf_counter()
        reps = embed(model, list(zip(df.id, df.sequence, strict=True)), layers=[layer], include=include,
                     toks_per_batch=toks_per_batch, progress=True, precision=precision)
        seconds += time.perf_counter() - start
        n_res += int(df.sequence.str.len().sum())
        data[name] = (np.stack([reps[i]["mean"][layer].numpy() for i in df.id]) if task == "go_mf"
                      else features(task, df, reps, layer))
    throughput = {"residues": n_res, "seconds": round(seconds, 2),
                  "residues_per_second": round(n_res / max(seconds, 1e-9), 1)}
    if task == "go_mf":
        vocabulary = go_vocabulary or term_vocabulary([split_terms(v) for v in train.go])
        report = run_go_probe(train, splits["test"], (data["train"], data["test"]), vocabulary,
                              valid=splits.get("valid"), valid_embeddings=data.get("valid"), Cs=Cs, seed=seed)
        return {"task": task, "layer": layer, **report, "embedding_throughput": throughput}
    classes = list(SS3_CLASSES) if task == "ss3" else sorted(set(getattr(train, task)))
    results = {}
    for name in track(FEATURE_SETS, desc=f"{task} probes", unit="fit"):
        x_train, y_train = data["train"][0][name], data["train"][1]
        best_C = Cs[0]
        if len(Cs) > 1:
            metric = MAIN_METRIC[task]
            scores = {C: score(task, data["valid"][1], make_probe(C, seed).fit(x_train, y_train)
                               .predict(data["valid"][0][name]), classes)[metric] for C in Cs}
            best_C = max(scores, key=scores.get)
        start = time.perf_counter()
        probe = make_probe(best_C, seed).fit(x_train, y_train)
        y_true, y_pred = data["test"][1], probe.predict(data["test"][0][name])
        results[name] = score(task, y_true, y_pred, classes) | {
            "C": best_C, "fit_seconds": round(time.perf_counter() - start, 1), "n_features": x_train.shape[1],
            "confusion": confusion_matrix(y_true, y_pred, labels=classes).tolist()}
    return {"task": task, "layer": layer, "classes": classes, "n_train_proteins": len(train),
            "n_test_proteins": len(splits["test"]), "n_train_items": int(len(data["train"][1])),
            "n_test_items": int(len(data["test"][1])),
            "embedding_throughput": throughput, "results": results}


def results_table(report: dict) -> pd.DataFrame:
    """One row per feature set: the main metrics (Q3, or accuracy and macro-F1) and the probe's C."""
    keys = {"ss3": ["q3"], "go_mf": ["fmax", "aupr", "threshold"]}.get(report["task"], ["accuracy", "macro_f1"])
    rows = {name: {k: r.get(k) for k in [*keys, "n_features", "C"]} for name, r in report["results"].items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_report(report: dict, path: Path) -> None:
    """Save row-normalised confusion matrices for each feature set and a per-class bar chart to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, results = report["classes"], report["results"]
    per_class = "per_class_recall" if report["task"] == "ss3" else "per_class_f1"
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5 * (len(results) + 1), 4.8))
    for ax, (name, r) in zip(axes, results.items(), strict=False):
        cm = np.asarray(r["confusion"], dtype=float)
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
        ax.set(title=f"{name} ({MAIN_METRIC[report['task']]} {r[MAIN_METRIC[report['task']]]:.3f})",
               xlabel="predicted", ylabel="true", xticks=range(len(classes)), yticks=range(len(classes)))
        ax.set_xticklabels(classes, rotation=90, fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
    ax = axes[-1]
    width = 0.8 / len(results)
    for j, (name, r) in enumerate(results.items()):
        ax.bar(np.arange(len(classes)) + j * width, [r[per_class][c] for c in classes], width, label=name)
    ax.set(title=per_class.replace("_", " "), ylim=(0, 1), xticks=np.arange(len(classes)) + 0.4)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def subsample(df: pd.DataFrame, n: int, label: str | None, seed: int, path: str | Path) -> pd.DataFrame:
    """``n`` random rows of ``df`` (fixed ``seed``); with a ``label`` column, stratified: every label keeps at least
    one row (so no valid label goes unseen), the rest drawn at random. Raises ProbeDataError when ``n`` is below
    the number of labels."""
    shuffled = df.sample(frac=1.0, random_state=seed)
    if label is None:
        return shuffled.head(n).reset_index(drop=True)
    first = shuffled.drop_duplicates(label)
    if len(first) > n:
        raise ProbeDataError(f"{path}: --max-sequences {n} is fewer than the {len(first)} labels of column "
                             f"{label!r}; give at least {len(first)}")
    rest = shuffled.drop(first.index).head(n - len(first))
    return pd.concat([first, rest]).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def read_tables(
    train_path: str | Path, valid_path: str | Path, test_path: str | Path | None = None,
    max_train: int | None = None, seed: int = 0,
) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame | None, list[str] | None]:
    """Read and cross-check a probe's tables: (task, train (sampled to ``max_train``), valid, test or None,
    GO vocabulary from the whole training table or None). Raises :class:`ProbeDataError` naming file, line and
    column (mismatched tasks, a valid/test label no training protein has)."""
    task, train = read_probe_csv(train_path)
    tables = {"valid": (valid_path, read_probe_csv(valid_path))}
    if test_path is not None:
        tables["test"] = (test_path, read_probe_csv(test_path))
    for name, (path, (got, _)) in tables.items():
        if got != task:
            raise ProbeDataError(f"{path}: --{name} is a {got!r} table but --train {train_path} is {task!r}")
    vocabulary = term_vocabulary([split_terms(v) for v in train.go]) if task == "go_mf" else None
    if max_train is not None and max_train < len(train):
        train = subsample(train, max_train, task if task in ("location", "fold_class") else None, seed, train_path)
    for path, (_, df) in tables.values():
        check_labels_seen(task, train, df, path)
    test = tables["test"][1][1] if "test" in tables else None
    return task, train, tables["valid"][1][1], test, vocabulary


def probe_files(
    model,
    train_path: str | Path,
    valid_path: str | Path,
    out: str | Path,
    test_path: str | Path | None = None,
    max_train: int | None = None,
    layer: int = -1,
    Cs: Sequence[float] = (1.0,),
    seed: int = 0,
    toks_per_batch: int = 4096,
    precision: str = "32",
    checkpoint: str | None = None,
) -> dict:
    """Read and check the CSVs, run :func:`run_probe` (task from the columns) and write ``out`` (JSON) and
    ``<out stem>.png`` (confusion matrices, or PR curves for go_mf); returns the report. ``checkpoint`` (its
    path) is recorded in the report when given."""
    task, train, valid, test, vocabulary = read_tables(train_path, valid_path, test_path, max_train, seed)
    report = run_probe(model, task, train, valid, test, layer=layer, Cs=Cs, seed=seed,
                       toks_per_batch=toks_per_batch, go_vocabulary=vocabulary, precision=precision)
    report |= {"train": str(train_path), "valid": str(valid_path), "test": str(test_path or valid_path),
               "max_train": max_train, "precision": precision}
    if checkpoint is not None:
        report["checkpoint"] = checkpoint
    out = write_json_atomic(out, report)
    (plot_go if task == "go_mf" else plot_report)(report, out.with_suffix(".png"))
    if task == "go_mf":
        print(f"\n{task}: {report['n_terms']} terms, train {report['n_train_proteins']} proteins, test "
              f"{report['n_test_proteins']} proteins ({report['n_evaluated_proteins']} with a vocabulary term), "
              f"layer {layer}; skipped: {report['skipped']}")
    else:
        print(f"\n{task}: train {report['n_train_proteins']} proteins ({report['n_train_items']} items), "
              f"test {report['n_test_proteins']} proteins ({report['n_test_items']} items), layer {layer}")
    print(results_table(report).to_string(float_format=lambda v: f"{v:.4f}"))
    through = report["embedding_throughput"]
    print(f"embedding: {through['residues']} residues in {through['seconds']} s "
          f"({through['residues_per_second']:.0f} residues/s)")
    print(f"results: {out}  plot: {out.with_suffix('.png')}")
    return report
