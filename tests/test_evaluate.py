"""pp-evaluate on the tiny checkpoint with small data: every section of the card, the README update, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from proteinperformer.cli.evaluate import main
from proteinperformer.data.datamodule import ProteinDataModule
from proteinperformer.data.unigram import unigram_baseline
from proteinperformer.evaluation.card import BEGIN, END

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "data" / "probes"


def _small(src: Path, dst: Path, n: int, column: str | None = None) -> Path:
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df = df[df.sequence.str.len() <= 150]
    if column:  # n of every class, so each valid label occurs in train
        df = pd.concat([df[df[column] == c].head(n) for c in sorted(set(df[column]))])
    else:
        df = df.head(n)
    df.to_csv(dst, index=False)
    return dst


def _data_args(tmp_path: Path) -> list[str]:
    args = []
    for task, folder, ext, n_train, n_valid, column in (
        ("ss3", "ss3", "csv", 12, 4, None), ("location", "deeploc", "csv", 3, 1, "location"),
        ("go-mf", "go_mf", "csv.gz", 60, 12, None), ("fold-class", "fold_class", "csv", 8, 2, "fold_class"),
    ):
        for split, n in (("train", n_train), ("valid", n_valid)):
            if column and split == "valid":
                # valid labels must occur in train: draw valid from the same classes as train
                train = pd.read_csv(tmp_path / f"{task}-train.csv", dtype=str, keep_default_na=False)
                df = pd.read_csv(PROBES / folder / f"valid.{ext}", dtype=str, keep_default_na=False)
                df = df[df[column].isin(set(train[column])) & (df.sequence.str.len() <= 150)]
                df.groupby(column).head(n).to_csv(tmp_path / f"{task}-valid.csv", index=False)
            else:
                _small(PROBES / folder / f"{split}.{ext}", tmp_path / f"{task}-{split}.csv", n, column)
            args += [f"--{task}-{split}", str(tmp_path / f"{task}-{split}.csv")]
    return args


def test_pp_evaluate_writes_the_whole_card(tiny_checkpoint, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# card\n\nhand-written\n\n{BEGIN}\nold numbers\n{END}\n\n## Use\nkept\n")
    out = tmp_path / "eval"
    main([str(tiny_checkpoint), "--out", str(out), *_data_args(tmp_path), "--valid-frac", "0.1", "--test-frac",
          "0.1", "--crop-length", "64", "--blosum-max-sequences", "4", "--blosum-crop-length", "60",
          "--contact-train-chains", "3", "--contact-max-length", "90", "--update-readme", str(readme)])
    card = json.loads((out / "card.json").read_text())
    s = card["sections"]
    assert set(s) == {"mlm", "ss3", "location", "go_mf", "fold_class", "blosum", "contacts", "dms"}
    assert s["dms"]["n"] == 4996 and -1 < s["dms"]["rho"]["model masked-marginals"] < 1
    assert abs(s["dms"]["rho"]["BLOSUM62(wt, mt)"] - 0.346) < 0.001  # model-free: the README's number
    dm = ProteinDataModule.from_hparams(fasta_path=str(ROOT / "data" / "uniprot_sample20k.fasta.gz"), valid_frac=0.1,
                                        test_frac=0.1, split_seed=0)
    dm.setup()
    assert s["mlm"]["unigram"] == "train-split frequencies of 25 residue letters, on every residue of the split"
    for split in ("valid", "test"):
        m = s["mlm"][split]
        assert m["n_masked"] > 100 and 0 < m["model"]["accuracy"] < 1 and m["model"]["perplexity"] > 1
        assert 0 < m["unigram"]["accuracy"] < 0.2 and 10 < m["unigram"]["perplexity"] < 25
        base = unigram_baseline(dm.splits["train"], dm.splits[split], dm.alphabet)  # training's definition
        assert m["unigram"] == pytest.approx({k: base[k] for k in ("accuracy", "perplexity", "residues")})
    assert set(s["go_mf"]["results"]) == {"embedding", "composition", "kmer3", "naive", "nn_kmer3"}
    assert all(0 < r["fmax"] <= 1 for r in s["go_mf"]["results"].values())
    assert all(0 <= r["macro_f1"] <= 1 for r in s["fold_class"]["results"].values())
    vig = s["blosum"]["methods"]["vig"]["model"]
    assert vig["n_heads"] == 4 and (vig["overall"]["BLOSUM62"] is None) == (vig["n_heads_kept"] < 2)
    assert math.isfinite(s["blosum"]["methods"]["weighted"]["model"]["overall"]["BLOSUM62"])
    assert 0 <= s["contacts"]["model"]["mean"]["long"]["L"] <= 1
    md = (out / "card.md").read_text()
    for text in ("masked residues, valid split", "GO molecular function", "structural class", "Vig et al. method",
                 "attention-weighted", "contacts, long range", "TEM-1 β-lactamase", "naive (term frequency)",
                 "pp-evaluate "):
        assert text in md
    assert (out / "card.png").stat().st_size > 10_000
    for f in ("probes/go_mf.png", "probes/fold_class.png", "blosum/attention_vs_blosum.png", "contacts/contacts.png"):
        assert (out / f).stat().st_size > 10_000
    text = readme.read_text()
    assert "old numbers" not in text and md in text and text.startswith("# card\n\nhand-written") and "kept" in text


def test_pp_evaluate_bad_probe_data_fails_before_any_work(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,sequence,go\na,MKV,GO:0003674\nb,MKV,binding\n")
    with pytest.raises(SystemExit, match=r"^error: .*bad.csv:3: id 'b': column 'go': 'binding' is not a GO id"):
        main([str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--go-mf-train", str(bad)])
    assert not (tmp_path / "o" / "card.json").exists()
