"""go_mf and fold_class probes: CAFA F-max and AUPR by hand and against cafaeval, k-mer and nearest-neighbour
baselines, bad input, and both tasks end to end on the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from proteinperformer.cli.probe import main
from proteinperformer.evaluation.go import (
    fmax,
    kmer_spectrum,
    label_matrix,
    micro_aupr,
    naive_scores,
    nearest_neighbour_scores,
    term_vocabulary,
)
from proteinperformer.evaluation.probe import ProbeDataError, location_metrics, read_probe_csv

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "data" / "probes"

Y = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
S = np.array([[0.9, 0.4, 0.6], [0.2, 0.1, 0.3]])


def test_fmax_toy_case_by_hand():
    # tau <= 0.1: all predicted, pr = (2/3 + 1/3)/2, rc = 1        -> F = 2/3
    # 0.1 < tau <= 0.2: protein 2 predicts {t1, t3}: pr = (2/3 + 1/2)/2, rc = 1  -> F = 0.7368
    # 0.2 < tau <= 0.3: protein 2 predicts {t3}: pr = (2/3 + 1)/2 = 5/6, rc = 1  -> F = 10/11 (the maximum)
    # 0.3 < tau <= 0.4: protein 2 predicts nothing: pr over protein 1 only = 2/3, rc = (1 + 0)/2 -> F = 4/7
    m = fmax(Y, S)
    assert m["fmax"] == pytest.approx(10 / 11)
    assert m["threshold"] == 0.21 and m["precision"] == pytest.approx(5 / 6) and m["recall"] == 1.0
    c = m["curve"]
    curve = {t: (p, r) for t, p, r in zip(c["threshold"], c["precision"], c["recall"], strict=True)}
    assert curve[0.1] == pytest.approx((0.5, 1.0))
    assert curve[0.2] == pytest.approx(((2 / 3 + 1 / 2) / 2, 1.0))
    assert curve[0.35] == pytest.approx((2 / 3, 0.5))
    assert curve[0.9] == pytest.approx((1.0, 0.25))
    assert max(curve) == 0.9  # no protein has a score >= 0.91: those thresholds have no precision
    with pytest.raises(ValueError, match="no true term"):
        fmax(np.array([[1, 0], [0, 0]], bool), np.zeros((2, 2)))


def test_micro_aupr_toy_case_by_hand():
    # pooled pairs by score: .9 (+), .6 (-), .4 (+), .3 (+), .2, .1 -> AP = (1 + 2/3 + 3/4) / 3
    assert micro_aupr(Y, S) == pytest.approx(29 / 36)


def test_fmax_matches_cafaeval(tmp_path):
    """CAFA's own evaluator (cafaeval, flat toy ontology so propagation changes nothing) gives the same F-max."""
    evaluation = pytest.importorskip("cafaeval.evaluation")
    rng = np.random.default_rng(0)
    n, t = 40, 12
    y = rng.random((n, t)) < 0.25
    y[np.arange(n), rng.integers(0, t, n)] = True  # every protein annotated
    s = np.clip(0.5 * y + 0.7 * rng.random((n, t)) - 0.1, 0.001, 0.999)
    terms = [f"GO:{i:07d}" for i in range(1, t + 1)]
    (tmp_path / "toy.obo").write_text("format-version: 1.2\n\n" + "".join(
        f"[Term]\nid: {go}\nname: term {go}\nnamespace: molecular_function\n\n" for go in terms))
    (tmp_path / "gt.tsv").write_text("".join(f"P{i}\t{terms[j]}\n" for i, j in zip(*np.nonzero(y), strict=True)))
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "m.tsv").write_text("".join(f"P{i}\t{terms[j]}\t{s[i, j]:.6f}\n"
                                                     for i in range(n) for j in range(t)))
    _, best = evaluation.cafa_eval(str(tmp_path / "toy.obo"), str(tmp_path / "pred"), str(tmp_path / "gt.tsv"),
                                   n_cpu=1)
    theirs = best["f"].iloc[0]
    ours = fmax(y, np.round(s, 6), thresholds=np.round(np.arange(1, 100) / 100, 2))  # cafaeval: 0.01 … 0.99
    assert ours["fmax"] == pytest.approx(theirs["f"], abs=1e-9)
    assert ours["precision"] == pytest.approx(theirs["pr"]) and ours["recall"] == pytest.approx(theirs["rc"])


def test_macro_f1_by_hand_for_fold_classes():
    m = location_metrics(["alpha_beta"] * 3 + ["mainly_alpha", "mainly_beta"],
                         ["alpha_beta", "alpha_beta", "mainly_alpha", "mainly_alpha", "alpha_beta"],
                         ["alpha_beta", "mainly_alpha", "mainly_beta"])
    # alpha_beta: precision 2/3, recall 2/3 -> 2/3; mainly_alpha: p 1/2, r 1 -> 2/3; mainly_beta: 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_kmer_spectrum_vocabulary_and_baselines():
    x = kmer_spectrum(["ACDA", "AXCDE", "AC"]).toarray()
    assert x.shape == (3, 8000)
    acd, cda, cde = (20 * 20 * "ACDEFGHIKLMNPQRSTVWY".index(a) + 20 * "ACDEFGHIKLMNPQRSTVWY".index(b)
                     + "ACDEFGHIKLMNPQRSTVWY".index(c) for a, b, c in ("ACD", "CDA", "CDE"))
    assert x[0, acd] == x[0, cda] == 0.5 and x[0].sum() == 1.0
    assert x[1, cde] == 1.0 and x[1].sum() == 1.0  # k-mers with X are left out
    assert x[2].sum() == 0.0  # too short for a 3-mer
    assert term_vocabulary([["a", "b"], ["a"], ["a", "c", "c"]], min_count=2) == ["a"]
    np.testing.assert_array_equal(label_matrix([["b", "z"], []], ["a", "b"]), [[False, True], [False, False]])
    np.testing.assert_allclose(naive_scores(np.array([[1, 0], [1, 1]], bool), 3), [[1.0, 0.5]] * 3)


def test_nearest_neighbour_transfer_by_hand():
    import scipy.sparse as sp

    train = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    y = np.array([[1, 0], [0, 1], [1, 1]], bool)
    test = sp.csr_matrix(np.array([[1.0, 0.0]]))
    # cosines to the test protein: 1, 0, 1/sqrt 2; k = 2 keeps rows 0 and 2
    s0, s2 = 1.0, 2**-0.5
    np.testing.assert_allclose(nearest_neighbour_scores(train, y, test, k=2),
                               [[(s0 + s2) / (s0 + s2), s2 / (s0 + s2)]])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_inputs_name_file_row_and_column(tmp_path):
    with pytest.raises(ProbeDataError, match=r"go.csv:3: id 'b': column 'go': 'GO:12' is not a GO id"):
        read_probe_csv(_write(tmp_path / "go.csv", "id,sequence,go\na,MKV,GO:0003674\nb,MKV,GO:0005488;GO:12\n"))
    with pytest.raises(ProbeDataError, match=r"empty.csv: no rows"):
        read_probe_csv(_write(tmp_path / "empty.csv", "id,sequence,fold_class\n"))
    with pytest.raises(ProbeDataError, match=r"lab.csv:2: id 'a': column 'fold_class': empty label"):
        read_probe_csv(_write(tmp_path / "lab.csv", "id,sequence,fold_class\na,MKV,\n"))
    with pytest.raises(ProbeDataError, match="fit no probe task"):
        read_probe_csv(_write(tmp_path / "cols.csv", "id,sequence,class\na,MKV,x\n"))
    train = _write(tmp_path / "train.csv", "id,sequence,fold_class\na,MKVL,alpha_beta\nb,MKVW,mainly_alpha\n")
    valid = _write(tmp_path / "valid.csv", "id,sequence,fold_class\nc,MKVL,alpha_beta\nd,MKVA,mainly_beta\n")
    with pytest.raises(SystemExit, match=r"^error: .*valid.csv:3: id 'd': column 'fold_class': label 'mainly_beta' "
                                             r"never occurs in the training table"):
        main(["no-such.ckpt", "--train", str(train), "--valid", str(valid), "--out", str(tmp_path / "r.json")])
    go = _write(tmp_path / "g.csv", "id,sequence,go\na,MKV,GO:0003674\n")
    with pytest.raises(SystemExit, match=r"^error: .*--valid is a 'fold_class' table but --train .* is 'go_mf'"):
        main(["no-such.ckpt", "--train", str(go), "--valid", str(valid), "--out", str(tmp_path / "r.json")])


def test_go_mf_probe_end_to_end(tiny_checkpoint, tmp_path, capsys):
    train = pd.read_csv(PROBES / "go_mf" / "train.csv.gz", dtype=str, keep_default_na=False)
    valid = pd.read_csv(PROBES / "go_mf" / "valid.csv.gz", dtype=str, keep_default_na=False)
    short = train[train.sequence.str.len() <= 150].head(80)
    short.to_csv(tmp_path / "train.csv", index=False)
    valid[valid.sequence.str.len() <= 150].head(25).to_csv(tmp_path / "valid.csv", index=False)
    out = tmp_path / "go.json"
    main([str(tiny_checkpoint), "--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
          "--out", str(out), "--max-sequences", "60"])
    report = json.loads(out.read_text())
    vocab = term_vocabulary([g.split(";") for g in short.go])  # from the whole training file, before sampling
    assert report["task"] == "go_mf" and report["n_terms"] == len(vocab) > 0 and report["n_train_proteins"] == 60
    assert report["n_evaluated_proteins"] + report["skipped"]["test_proteins_without_vocabulary_term"] == 25
    assert set(report["results"]) == {"embedding", "composition", "kmer3", "naive", "nn_kmer3"}
    for r in report["results"].values():
        assert 0 < r["fmax"] <= 1 and 0 < r["aupr"] <= 1 and 0.01 <= r["threshold"] <= 1
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "nn_kmer3" in capsys.readouterr().out


def test_fold_class_probe_end_to_end(tiny_checkpoint, tmp_path):
    train = pd.read_csv(PROBES / "fold_class" / "train.csv", dtype=str, keep_default_na=False)
    valid = pd.read_csv(PROBES / "fold_class" / "valid.csv", dtype=str, keep_default_na=False)
    pick = lambda df, n: pd.concat([df[df.fold_class == c].head(n) for c in sorted(set(df.fold_class))])  # noqa: E731
    pick(train, 12).to_csv(tmp_path / "train.csv", index=False)
    pick(valid, 4).to_csv(tmp_path / "valid.csv", index=False)
    out = tmp_path / "fold.json"
    main([str(tiny_checkpoint), "--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["task"] == "fold_class" and report["classes"] == ["alpha_beta", "mainly_alpha", "mainly_beta"]
    assert report["n_train_proteins"] == 36 and report["n_test_proteins"] == 12
    for r in report["results"].values():
        f1 = list(r["per_class_f1"].values())
        assert r["macro_f1"] == pytest.approx(np.mean(f1)) and 0 <= r["accuracy"] <= 1
        assert np.asarray(r["confusion"]).sum() == 12
    assert out.with_suffix(".png").stat().st_size > 10_000
