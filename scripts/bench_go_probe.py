"""GO-MF probe benchmark: scikit-learn's one lbfgs ``LogisticRegression`` per term (what ``pp-probe`` runs on
dense features), with BLAS at its default thread count against BLAS limited to one thread
(``threadpoolctl.threadpool_limits(1)``, scikit-learn's own dependency), same features, same run.

    python scripts/bench_go_probe.py --max-train 1000 --max-test 500 --max-len 512  # results/bench_go_probe.json

Each of the 457-odd fits is tiny ([1000, 192]): multi-threaded BLAS only adds synchronisation, and on a loaded
machine the threads wait for cores, which is where GO-MF's quarter of an hour went.

Data: ``$PP_SHARED_DATA/probes/go_mf`` (else ``data/probes/go_mf``): ``--max-train`` proteins of train.csv
(pp-probe's sample: ``read_tables``), scored on valid.csv with the vocabulary of the training sample.
Features: the shipped checkpoint's mean final-layer embeddings (``embedding``, cached in ``--cache`` so every
fit sees identical features) and amino-acid composition. Prints seconds and F-max / micro-AUPR of both runs and
writes ``results/bench_go_probe.json``. The machine may be shared: compare the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

from proteinperformer.evaluation.go import (
    _composition,
    label_matrix,
    score_go,
    split_terms,
)
from proteinperformer.evaluation.probe import read_tables
from proteinperformer.files import resolve_path

ROOT = Path(__file__).resolve().parents[1]


def per_term_scores(x_train, y_train: np.ndarray, x_test, C: float = 1.0, seed: int = 0) -> np.ndarray:
    """The fit before: one scikit-learn lbfgs LogisticRegression per term (dense features)."""
    scaler = StandardScaler().fit(x_train)
    a, b = scaler.transform(x_train), scaler.transform(x_test)
    out = np.zeros((b.shape[0], y_train.shape[1]))
    for j in range(y_train.shape[1]):
        yj = y_train[:, j]
        if yj.all() or not yj.any():
            out[:, j] = float(yj.all())
            continue
        clf = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(a, yj)
        out[:, j] = clf.predict_proba(b)[:, 1]
    return out


def embeddings(train, test, checkpoint: Path, cache: Path, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean final-layer embeddings of both tables, proteins cropped to ``max_len`` residues (cached by table sizes,
    crop and checkpoint name)."""
    path = cache / f"go_emb_{checkpoint.stem}_{len(train)}_{len(test)}_{max_len}.npz"
    if path.is_file():
        data = np.load(path)
        return data["train"], data["test"]
    from proteinperformer import embed, load_model

    model = load_model(checkpoint)
    out = []
    for df in (train, test):
        reps = embed(model, [(i, s[:max_len]) for i, s in zip(df.id, df.sequence, strict=True)], layers=[-1],
                     include=["mean"], on_long="truncate", progress=True)
        out.append(np.stack([reps[i]["mean"][-1].numpy() for i in df.id]))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=out[0], test=out[1])
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-train", type=int, default=3000, help="training proteins (pp-evaluate's default)")
    parser.add_argument("--max-test", type=int, default=None, help="score this many valid.csv proteins (sampled)")
    parser.add_argument("--max-len", type=int, default=1000, help="embedding: crop proteins to this many residues")
    parser.add_argument("--methods", nargs="+", default=["embedding", "composition"],
                        choices=["embedding", "composition"])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "weights" / "pp_mlm_relu_2.7M.ckpt")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pp_bench_go"), help="embedding cache folder")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_go_probe.json")
    args = parser.parse_args()
    shared = resolve_path(os.environ.get("PP_SHARED_DATA", "../shared/data")) / "probes" / "go_mf"
    folder = shared if (shared / "train.csv").is_file() else ROOT / "data" / "probes" / "go_mf"
    suffix = "" if (folder / "train.csv").is_file() else ".gz"
    _, train, test, _, vocabulary = read_tables(folder / f"train.csv{suffix}", folder / f"valid.csv{suffix}",
                                                max_train=args.max_train, seed=0)
    if args.max_test is not None and args.max_test < len(test):
        test = test.sample(n=args.max_test, random_state=0).reset_index(drop=True)
    y_train = label_matrix([split_terms(v) for v in train.go], vocabulary)
    y_test = label_matrix([split_terms(v) for v in test.go], vocabulary)
    keep = y_test.any(1)
    feats = {}
    if "embedding" in args.methods:
        feats["embedding"] = embeddings(train, test, args.checkpoint, args.cache, args.max_len)
    if "composition" in args.methods:
        feats["composition"] = (_composition(train.sequence), _composition(test.sequence))
    rows = []
    for name, (a, b) in feats.items():
        row = {"method": name, "n_features": a.shape[1]}
        for fit in ("one_thread", "default_threads"):
            start = time.perf_counter()
            if fit == "one_thread":
                with threadpool_limits(1):
                    scores = per_term_scores(a, y_train, b)
            else:
                scores = per_term_scores(a, y_train, b)
            seconds = time.perf_counter() - start
            if fit == "one_thread":
                first = scores
            else:
                row["max_abs_probability_difference"] = float(np.abs(scores - first).max())
            metrics = score_go(y_test[keep], scores[keep])
            row[fit] = {"seconds": round(seconds, 1), "fmax": round(metrics["fmax"], 4),
                        "aupr": round(metrics["aupr"], 4), "threshold": metrics["threshold"]}
            print(f"{name:12s} {fit:9s} {seconds:8.1f} s  F-max {metrics['fmax']:.4f}  AUPR {metrics['aupr']:.4f}",
                  flush=True)
        row["speedup"] = round(row["default_threads"]["seconds"] / row["one_thread"]["seconds"], 1)
        rows.append(row)
    total = {fit: round(sum(r[fit]["seconds"] for r in rows), 1) for fit in ("one_thread", "default_threads")}
    print(f"{'method':12s} {'features':>8s} {'default-thr s':>13s} {'1-thread s':>10s} {'speed-up':>8s} "
          f"{'F-max default':>13s} {'F-max 1-thread':>14s}")
    for r in rows:
        d, o = r["default_threads"], r["one_thread"]
        print(f"{r['method']:12s} {r['n_features']:8d} {d['seconds']:13.1f} {o['seconds']:10.1f} "
              f"{r['speedup']:7.1f}x {d['fmax']:13.4f} {o['fmax']:14.4f}")
    print(f"total: default threads {total['default_threads']} s, one thread {total['one_thread']} s")
    report = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "max_train": len(train),
              "n_test": int(len(test)), "n_evaluated": int(keep.sum()), "n_terms": len(vocabulary),
              "checkpoint": args.checkpoint.name, "embedding_max_len": args.max_len, "rows": rows,
              "blas_threads": [(i["internal_api"], i["num_threads"]) for i in threadpool_info()],
              "total_seconds": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
