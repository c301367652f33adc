"""Probes: metrics on hand-computed toy cases, baseline features, CSV validation, end-to-end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from proteinperformer.cli.probe import main
from proteinperformer.evaluation.baselines import onehot
from proteinperformer.evaluation.probe import (
    ProbeDataError,
    composition,
    features,
    location_metrics,
    read_probe_csv,
    ss3_metrics,
    terminal_onehot,
    window_composition,
    window_onehot,
)

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "data" / "probes"


def test_ss3_metrics_hand_computed():
    m = ss3_metrics(list("HHEC"), list("HEEC"))
    assert m["q3"] == 0.75
    assert m["per_class_recall"] == {"H": 0.5, "E": 1.0, "C": 1.0}


def test_location_metrics_hand_computed():
    m = location_metrics(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert m["accuracy"] == 0.5
    # F1: a = 2·1·0.5/1.5 = 2/3; b = precision 1/3, recall 1 -> 0.5; c = 0
    assert m["per_class_f1"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 3)


def test_composition_sums_to_one_and_counts_rare_letters():
    comp = composition("AACX")
    assert comp.shape == (21,)
    assert comp.sum() == pytest.approx(1.0)
    assert comp[0] == 0.5 and comp[1] == 0.25 and comp[20] == 0.25  # A, C, other
    wc = window_composition("MKTAYIAKQRQISFVKSHFSRQ", window=7)
    assert wc.shape == (22, 21)
    np.testing.assert_allclose(wc.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(wc[0], composition("MKTAYIAK"))  # residue 0 sees residues 0..7
    np.testing.assert_allclose(wc[10], composition("AYIAKQRQISFVKSH"))  # residues 3..17


def test_window_onehot_layout():
    seq = "ACDEFGHIKL"
    x = window_onehot(seq, window=7)
    assert x.shape == (10, 15 * 21)
    blocks = x.reshape(10, 15, 21)
    np.testing.assert_array_equal(blocks[:, 7], onehot(seq))  # centre block = the residue itself
    assert blocks[4, 7 + 2].argmax() == "ACDEFGHIKL".index("H")  # offset +2 of residue 4 (F) is H
    assert blocks[0, :7].sum() == 0 and blocks[9, 8:].sum() == 0  # zeros past the ends
    assert blocks.sum(2).max() == 1


def test_terminal_onehot_pads_short_proteins():
    x = terminal_onehot("MKV", n=5).reshape(10, 21)
    assert x[:3].sum() == 3 and x[3:7].sum() == 0 and x[7:].sum() == 3
    assert x[0].argmax() == onehot("M").argmax() and x[9].argmax() == onehot("V").argmax()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_probe_csv_errors_name_file_line_and_id(tmp_path):
    ok = _write(tmp_path / "ok.csv", "id,sequence,ss3,mask\na,MKV,HHC,110\n")
    assert read_probe_csv(ok)[0] == "ss3"
    bad_len = _write(tmp_path / "len.csv", "id,sequence,ss3,mask\na,MKV,HHC,110\nb,MKV,HH,110\n")
    with pytest.raises(ProbeDataError, match=r"len.csv:3: id 'b': lengths differ"):
        read_probe_csv(bad_len)
    with pytest.raises(ProbeDataError, match=r"lab.csv:2: id 'a': ss3 labels \['X'\]"):
        read_probe_csv(_write(tmp_path / "lab.csv", "id,sequence,ss3,mask\na,MKV,HXC,110\n"))
    with pytest.raises(ProbeDataError, match=r"dup.csv:3: id 'a': duplicate id \(first at line 2\)"):
        read_probe_csv(_write(tmp_path / "dup.csv", "id,sequence,location\na,MKV,Nucleus\na,MKW,Nucleus\n"))
    with pytest.raises(ProbeDataError, match=r"aa.csv:2: id 'a'.*invalid character '1'"):
        read_probe_csv(_write(tmp_path / "aa.csv", "id,sequence,location\na,MK1,Nucleus\n"))
    with pytest.raises(ProbeDataError, match="fit no probe task"):
        read_probe_csv(_write(tmp_path / "cols.csv", "name,seq\na,MKV\n"))


def test_ss3_features_skip_unresolved_residues():
    df = pd.DataFrame({"id": ["a", "b"], "sequence": ["MKVL", "GS"], "ss3": ["HHEC", "CC"], "mask": ["0110", "01"]})
    sets, labels = features("ss3", df, None, -1)
    assert list(labels) == ["H", "E", "C"]
    assert sets["onehot"].shape == (3, 315) and sets["composition"].shape == (3, 21)
    np.testing.assert_array_equal(sets["onehot"][0].reshape(15, 21)[7], onehot("K")[0])


def _subset(src: Path, dst: Path, n: int) -> Path:
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df[df.sequence.str.len() <= 200].head(n).to_csv(dst, index=False)
    return dst


@pytest.mark.parametrize("task,metric", [("ss3", "q3"), ("deeploc", "accuracy")])
def test_probe_end_to_end(tiny_checkpoint, tmp_path, capsys, task, metric):
    train = _subset(PROBES / task / "train.csv", tmp_path / "train.csv", 30)
    valid = _subset(PROBES / task / "valid.csv", tmp_path / "valid.csv", 10)
    out = tmp_path / "res" / "results.json"
    main([str(tiny_checkpoint), "--train", str(train), "--valid", str(valid), "--out", str(out),
          "--max-sequences", "20"])
    report = json.loads(out.read_text())
    assert report["n_train_proteins"] == 20 and report["n_test_proteins"] == len(pd.read_csv(valid))
    assert set(report["results"]) == {"embedding", "onehot", "composition"}
    for r in report["results"].values():
        assert 0.0 <= r[metric] <= 1.0
        assert np.asarray(r["confusion"]).sum() == report["n_test_items"]
    assert report["embedding_throughput"]["residues_per_second"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "embedding" in table and "composition" in table and metric in table
