"""The command-line tools pp-attention-blosum and pp-contacts on the tiny checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from proteinperformer.cli import attention_blosum as blosum_cli
from proteinperformer.cli import contacts as contacts_cli

ROOT = Path(__file__).resolve().parents[1]


def test_attention_vs_blosum_cli(tiny_checkpoint, tmp_path):
    blosum_cli.main([str(tiny_checkpoint), str(ROOT / "data/uniprot_sample20k.fasta.gz"), "--max-sequences", "6",
                     "--crop-length", "60", "--out", str(tmp_path), "--matrices", "BLOSUM62", "PAM250"])
    res = json.loads((tmp_path / "attention_vs_blosum.json").read_text())
    assert res["n_sequences"] == 6 and res["n_residues"] <= 6 * 60
    assert res["method"] == "vig" and res["model"] == res["methods"]["vig"]["model"]
    assert (res["vig_threshold"], res["vig_min_edges"]) == (0.3, 100)
    weighted = res["methods"]["weighted"]
    for part in ("model", "null_random_init"):
        assert set(weighted[part]["overall"]) == {"BLOSUM62", "PAM250"}
        assert math.isfinite(weighted[part]["overall"]["BLOSUM62"])
        assert len(weighted[part]["per_layer"]["BLOSUM62"]) == res["layers"] == 2
        vig = res["methods"]["vig"][part]
        assert vig["n_heads"] == 4 and 0 <= vig["n_heads_kept"] <= 4
        assert sum(map(sum, vig["edges_per_head"])) <= 6 * 60 * 60 * 4  # at most every (query, key) pair
        assert (vig["overall"]["BLOSUM62"] is None) == (vig["n_heads_kept"] < 2)  # NaN is written as null
    assert weighted["model"]["overall"]["BLOSUM62"] != weighted["null_random_init"]["overall"]["BLOSUM62"]
    assert (tmp_path / "attention_vs_blosum.png").stat().st_size > 10_000
    assert (tmp_path / "aa_pair_counts.npz").exists()


def test_contacts_cli(tiny_checkpoint, tmp_path, capsys):
    contacts_cli.main([str(tiny_checkpoint), "--structures", str(ROOT / "data/structures/pdb_chains_subset60.npz"),
                       "--train-chains", "4", "--max-sequences", "8", "--max-length", "210", "--atom", "ca",
                       "--out", str(tmp_path)])
    res = json.loads((tmp_path / "contacts.json").read_text())
    assert res["n_train"] == 4 and res["n_test"] == 3 and res["contact_definition"].startswith("CA")
    assert res["n_skipped_long"] == 1  # the fifth chain has 247 residues: skipped, counted and named
    assert f"1 chains longer than --max-length 210 skipped: {res['skipped_long_ids'][0]}" in capsys.readouterr().out
    for part in ("model", "null_random_init"):
        for rng in ("medium", "long"):
            assert all(0 <= v <= 1 for v in res[part]["mean"][rng].values())
        assert len(res[part]["per_chain"]) == 3
    assert (tmp_path / "contacts.png").stat().st_size > 10_000
