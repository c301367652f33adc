"""Function prediction: Gene Ontology molecular-function terms, scored the CAFA way (the ``go_mf`` probe).

Task (CSV columns id, sequence, go; ``go`` holds the propagated terms, ``;``-separated): every protein gets a
score in [0, 1] for every term of the vocabulary, the terms annotated to ≥ ``min_count`` (20) proteins of the
training file. Terms outside the vocabulary are ignored in training and scoring (counted in the report).

Metrics (:func:`fmax`, :func:`micro_aupr`):

- protein-centric **F-max** (CAFA, Radivojac et al. 2013): at threshold τ (0.01, 0.02, …, 1.00) protein i is
  predicted the terms scored ≥ τ; precision pr(τ) is averaged over the proteins with at least one predicted term,
  recall rc(τ) over all evaluated proteins; F-max = max_τ 2·pr·rc / (pr + rc). Evaluated proteins are those with
  at least one vocabulary term (the others are skipped and counted, as CAFA only scores annotated proteins).
- **micro-AUPR**: area under the precision-recall curve of all (protein, term) pairs pooled
  (scikit-learn's ``average_precision_score`` on the flattened matrices).

Methods, all scored on the same proteins and terms:

- ``embedding``: one-vs-rest logistic regression per term on standardised mean embeddings;
- ``composition``: the same on amino-acid composition (21 fractions);
- ``kmer3``: the same on the 3-mer spectrum (8,000 standard-residue 3-mer frequencies, sparse; scaled without
  centring and fitted in the dual, which is what keeps 477 fits to about a minute);
- ``naive``: CAFA's naive baseline, every protein gets each term's training frequency;
- ``nn_kmer3``: nearest-neighbour transfer (a stand-in for BLAST/DIAMOND transfer): the ``k`` = 10 training
  proteins with the most similar 3-mer spectra (cosine similarity s_n); a term's score is
  Σ_{n carrying it} s_n / Σ_n s_n (DeepGOPlus's "DiamondScore" with similarities in place of bit scores).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from proteinperformer.evaluation.baselines import composition
from proteinperformer.files import save_figure_atomic
from proteinperformer.progress import track
from proteinperformer.tokenizer import STANDARD_RESIDUES

GO_ID = re.compile(r"GO:\d{7}")
THRESHOLDS = np.round(np.arange(1, 101) / 100, 2)  # CAFA's τ grid 0.01 … 1.00
MIN_COUNT = 20
KMER = 3
NEIGHBOURS = 10
METHODS = ("embedding", "composition", "kmer3", "naive", "nn_kmer3")

_AA = np.full(256, -1, dtype=np.int64)
for _i, _aa in enumerate(STANDARD_RESIDUES):
    _AA[ord(_aa)] = _i


def split_terms(value: str) -> list[str]:
    """The GO ids of one ``go`` cell (``;``-separated, empty = no terms)."""
    return [t for t in value.split(";") if t] if value else []


def check_go_column(df: pd.DataFrame, path: Path | str) -> None:
    """Raise ``ValueError`` naming ``file:line``, the id and column ``go`` for any item that is not ``GO:NNNNNNN``."""
    for i, (pid, value) in enumerate(zip(df.id, df.go, strict=True)):
        for term in value.split(";") if value else []:
            if not GO_ID.fullmatch(term):
                raise ValueError(f"{path}:{i + 2}: id {pid!r}: column 'go': {term!r} is not a GO id (GO:NNNNNNN, "
                                 "terms separated by ';')")


def term_vocabulary(terms: Sequence[Sequence[str]], min_count: int = MIN_COUNT) -> list[str]:
    """Terms annotated to at least ``min_count`` of the given proteins, sorted."""
    counts = Counter(t for ts in terms for t in set(ts))
    return sorted(t for t, n in counts.items() if n >= min_count)


def label_matrix(terms: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> np.ndarray:
    """Bool [N, T]: protein i carries term j of ``vocabulary`` (other terms ignored)."""
    index = {t: j for j, t in enumerate(vocabulary)}
    y = np.zeros((len(terms), len(vocabulary)), dtype=bool)
    for i, ts in enumerate(terms):
        for t in ts:
            if t in index:
                y[i, index[t]] = True
    return y


# ---- metrics ------------------------------------------------------------------------------------
def fmax(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> dict:
    """Protein-centric F-max (CAFA) of ``scores`` [N, T] against bool ``y_true`` [N, T].

    Every row must carry at least one true term (filter unannotated proteins first). Returns ``{"fmax",
    "threshold", "precision", "recall", "coverage"}`` at the best τ and the whole curve (``curve``: lists of
    τ, precision, recall, coverage = share of proteins with a prediction; τ where no protein has a prediction
    are left out, as precision is undefined there).
    """
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    n_true = y.sum(1)
    if (n_true == 0).any():
        raise ValueError(f"{int((n_true == 0).sum())} proteins have no true term; F-max needs annotated proteins")
    curve: dict[str, list[float]] = {"threshold": [], "precision": [], "recall": [], "coverage": []}
    for tau in thresholds:
        pred = s >= tau
        n_pred = pred.sum(1)
        covered = n_pred > 0
        if not covered.any():
            continue
        tp = (pred & y).sum(1)
        curve["threshold"].append(float(tau))
        curve["precision"].append(float((tp[covered] / n_pred[covered]).mean()))
        curve["recall"].append(float((tp / n_true).mean()))
        curve["coverage"].append(float(covered.mean()))
    pr, rc = np.array(curve["precision"]), np.array(curve["recall"])
    f = np.divide(2 * pr * rc, pr + rc, out=np.zeros_like(pr), where=(pr + rc) > 0)
    if len(f) == 0:
        return {"fmax": 0.0, "threshold": None, "precision": None, "recall": None, "coverage": 0.0, "curve": curve}
    best = int(np.argmax(f))
    return {"fmax": float(f[best]), "threshold": curve["threshold"][best], "precision": float(pr[best]),
            "recall": float(rc[best]), "coverage": curve["coverage"][best], "curve": curve}


def micro_aupr(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve of all (protein, term) pairs pooled (average precision)."""
    return float(average_precision_score(np.asarray(y_true, bool).ravel(), np.asarray(scores, float).ravel()))


# ---- features and baselines ---------------------------------------------------------------------
def kmer_spectrum(sequences: Sequence[str], k: int = KMER) -> sp.csr_matrix:
    """Sparse [N, 20^k] k-mer frequencies (k-mers of the 20 standard residues; rows sum to 1, or 0 if none)."""
    rows, cols = [], []
    for i, seq in enumerate(sequences):
        idx = _AA[np.frombuffer(seq.upper().encode("latin-1"), dtype=np.uint8)]
        if len(idx) < k:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(idx, k)
        windows = windows[(windows >= 0).all(1)]
        codes = windows @ (20 ** np.arange(k - 1, -1, -1))
        rows.append(np.full(len(codes), i))
        cols.append(codes)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    x = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(sequences), 20**k))
    x.sum_duplicates()
    totals = np.asarray(x.sum(1)).ravel()
    return sp.diags(np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)) @ x


def naive_scores(y_train: np.ndarray, n: int) -> np.ndarray:
    """CAFA naive baseline: each term's training frequency for every one of ``n`` proteins: [n, T]."""
    return np.tile(np.asarray(y_train, float).mean(0), (n, 1))


def nearest_neighbour_scores(x_train: sp.spmatrix, y_train: np.ndarray, x_test: sp.spmatrix,
                             k: int = NEIGHBOURS) -> np.ndarray:
    """Transfer from the ``k`` most similar training proteins (cosine s_n of the feature rows): [N_test, T],
    a term's score = Σ_{neighbours carrying it} s_n / Σ_{neighbours} s_n (0 where all similarities are 0)."""
    def unit(x):
        norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        return sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ x

    sim = np.asarray((unit(x_test) @ unit(x_train).T).todense())  # [N_test, N_train]
    k = min(k, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [N_test, k]
    s = np.clip(np.take_along_axis(sim, top, 1), 0.0, None)  # [N_test, k]
    votes = np.einsum("nk,nkt->nt", s, np.asarray(y_train, np.float64)[top])
    total = s.sum(1, keepdims=True)
    return np.divide(votes, total, out=np.zeros_like(votes), where=total > 0)


def one_vs_rest_scores(x_train, y_train: np.ndarray, x_test, C: float = 1.0, seed: int = 0,
                       desc: str = "terms") -> np.ndarray:
    """One logistic regression per term on standardised features; returns P(term) [N_test, T]. A term with
    no positive (or no negative) training protein gets the constant 0 (or 1)."""
    sparse = sp.issparse(x_train)
    scaler = StandardScaler(with_mean=not sparse).fit(x_train)
    a, b = scaler.transform(x_train), scaler.transform(x_test)
    out = np.zeros((b.shape[0], y_train.shape[1]))
    # One BLAS thread: each fit is tiny, and with BLAS on several threads they mostly wait for each other
    # (scripts/bench_go_probe.py: 103.9 s -> 7.7 s for 1,000 proteins, identical probabilities and F-max).
    with threadpool_limits(limits=1, user_api="blas"):
        for j in track(range(y_train.shape[1]), desc=desc, unit="term", leave=False):
            yj = y_train[:, j]
            if yj.all() or not yj.any():
                out[:, j] = float(yj.all())
                continue
            solver = {"solver": "liblinear", "dual": True} if sparse else {"solver": "lbfgs"}
            clf = LogisticRegression(C=C, max_iter=1000, random_state=seed, **solver).fit(a, yj)
            out[:, j] = clf.predict_proba(b)[:, 1]
    return out


def score_go(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """F-max (with its curve) and micro-AUPR of one method on the evaluated proteins."""
    return fmax(y_true, scores) | {"aupr": micro_aupr(y_true, scores)}


# ---- the run ------------------------------------------------------------------------------------
def run_go_probe(
    train: pd.DataFrame,
    test: pd.DataFrame,
    embeddings: tuple[np.ndarray, np.ndarray] | None,
    vocabulary: Sequence[str],
    valid: pd.DataFrame | None = None,
    valid_embeddings: np.ndarray | None = None,
    Cs: Sequence[float] = (1.0,),
    seed: int = 0,
    neighbours: int = NEIGHBOURS,
) -> dict:
    """Score every method on ``test``; ``embeddings`` = (train [N, D], test [N_test, D]) mean embeddings or
    None (baselines only). With several ``Cs`` the best C per logistic-regression method is chosen by F-max on
    ``valid`` (then ``valid`` and ``valid_embeddings`` are needed). Returns a JSON-ready dict."""
    train_terms = [split_terms(v) for v in train.go]
    test_terms = [split_terms(v) for v in test.go]
    y_train, y_test = label_matrix(train_terms, vocabulary), label_matrix(test_terms, vocabulary)
    keep = y_test.any(1)  # CAFA scores annotated proteins only
    vocab_set = set(vocabulary)
    skipped = {
        "test_proteins_without_vocabulary_term": int((~keep).sum()),
        "train_proteins_without_vocabulary_term": int((~y_train.any(1)).sum()),
        "test_annotations_outside_vocabulary": sum(t not in vocab_set for ts in test_terms for t in ts),
        "terms_without_positive_train_protein": int((~y_train.any(0)).sum()),
    }
    if not keep.any():
        raise ValueError("no test protein carries a vocabulary term: nothing to score")
    feats_train = {"composition": _composition(train.sequence), "kmer3": kmer_spectrum(train.sequence)}
    feats_test = {"composition": _composition(test.sequence), "kmer3": kmer_spectrum(test.sequence)}
    feats_valid = {}
    if valid is not None and len(Cs) > 1:
        feats_valid = {"composition": _composition(valid.sequence), "kmer3": kmer_spectrum(valid.sequence)}
        y_valid = label_matrix([split_terms(v) for v in valid.go], vocabulary)
    if embeddings is not None:
        feats_train["embedding"], feats_test["embedding"] = embeddings
        if feats_valid:
            feats_valid["embedding"] = valid_embeddings
    results: dict[str, dict] = {}
    for name in track(METHODS, desc="go_mf methods", unit="method"):
        if name == "embedding" and embeddings is None:
            continue
        C = None
        if name == "naive":
            scores = naive_scores(y_train, len(test))
        elif name == "nn_kmer3":
            scores = nearest_neighbour_scores(feats_train["kmer3"], y_train, feats_test["kmer3"], neighbours)
        else:
            C = Cs[0]
            if len(Cs) > 1:
                if not feats_valid:
                    raise ValueError("choosing C among several values needs a validation set separate from the test")
                vk = y_valid.any(1)
                by_C = {c: fmax(y_valid[vk], one_vs_rest_scores(feats_train[name], y_train, feats_valid[name], c,
                                                                seed, f"{name} C={c}")[vk])["fmax"] for c in Cs}
                C = max(by_C, key=by_C.get)
            scores = one_vs_rest_scores(feats_train[name], y_train, feats_test[name], C, seed, name)
        n_features = feats_train[name].shape[1] if name in feats_train else None
        results[name] = score_go(y_test[keep], scores[keep]) | {"C": C, "n_features": n_features}
        results[name]["pr_curve"] = _pr_curve(y_test[keep], scores[keep])
    return {"n_terms": len(vocabulary), "n_train_proteins": len(train), "n_test_proteins": len(test),
            "n_evaluated_proteins": int(keep.sum()), "skipped": skipped,
            "mean_terms_per_test_protein": float(y_test[keep].sum(1).mean()), "results": results}


def _composition(sequences: Sequence[str]) -> np.ndarray:
    return np.stack([composition(s) for s in sequences])


def _pr_curve(y_true: np.ndarray, scores: np.ndarray, points: int = 200) -> dict:
    """The pooled precision-recall curve, thinned to about ``points`` points for the JSON and plot."""
    precision, recall, _ = precision_recall_curve(y_true.ravel(), scores.ravel())
    idx = np.unique(np.linspace(0, len(precision) - 1, points).astype(int))
    return {"precision": np.round(precision[idx], 4).tolist(), "recall": np.round(recall[idx], 4).tolist()}


def plot_go(report: dict, path: Path) -> None:
    """Protein-centric precision-recall curves over τ (F-max marked) and pooled PR curves, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, r in report["results"].items():
        c = r["curve"]
        line, = axes[0].plot(c["recall"], c["precision"], label=f"{name} (F-max {r['fmax']:.3f})")
        if r["recall"] is not None:
            axes[0].plot([r["recall"]], [r["precision"]], "o", color=line.get_color())
        axes[1].plot(r["pr_curve"]["recall"], r["pr_curve"]["precision"], color=line.get_color(),
                     label=f"{name} (AUPR {r['aupr']:.3f})")
    axes[0].set(title="protein-centric, thresholds 0.01-1.00", xlabel="recall", ylabel="precision", xlim=(0, 1),
                ylim=(0, 1))
    axes[1].set(title="all (protein, term) pairs pooled", xlabel="recall", ylabel="precision", xlim=(0, 1),
                ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"GO molecular function: {report['n_terms']} terms, {report['n_evaluated_proteins']} proteins")
    fig.tight_layout()
    save_figure_atomic(fig, path)
