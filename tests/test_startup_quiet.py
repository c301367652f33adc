"""A new user's first hour: commands answer ``--help`` without importing torch or Lightning, Lightning's banners
are off unless asked for, long jobs say how long they will take.
(The timing itself is measured by scripts/bench_startup.py, not asserted here.)"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
from hydra import compose, initialize_config_dir

from proteinperformer.files import CONFIG_DIR
from tests.conftest import ROOT, tiny_config

HEAVY = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "sklearn", "pandas", "hydra", "scipy")


def _heavy_modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + f"\nimport sys; print(sorted({{m.split('.')[0] for m in "
                          f"sys.modules}} & set({HEAVY!r})))"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def test_package_and_every_command_help_import_nothing_heavy() -> None:
    code = """
import importlib, pkgutil
import proteinperformer, proteinperformer.progress, proteinperformer.options, proteinperformer.cli as cli
names = [m.name for m in pkgutil.iter_modules(cli.__path__) if m.name != "common"]
assert len(names) == 11, names
for name in names:
    module = importlib.import_module(f"proteinperformer.cli.{name}")
    text = module.help_text() if name == "train" else module.create_parser().format_help()
    assert "--" in text or "group" in text, name
"""
    assert _heavy_modules_after(code) == []


def test_embed_and_load_model_import_without_lightning() -> None:
    heavy = _heavy_modules_after("from proteinperformer import embed, load_model")
    assert "torch" in heavy  # they run models
    assert not {"pytorch_lightning", "lightning", "lightning_fabric", "hydra"} & set(heavy), heavy


LIGHTNING_NOTICES = ("GPU available", "TPU available", "litlogger", "Total params")


def test_a_training_run_shows_its_own_lines_not_lightnings(tmp_path, capfd, caplog) -> None:
    from proteinperformer.training.train import train

    caplog.set_level("INFO")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(tmp_path, ["data.max_sequences=120", "trainer.max_steps=1", "trainer.val_check_interval=1",
                                     "trainer.limit_val_batches=1"]))
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert not [n for n in LIGHTNING_NOTICES if n in text], text
    third_party = [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)
                   and "proteinperformer" not in w.filename]
    assert not third_party, [str(w.message) for w in third_party]
    assert "validation (mlm, step 1)" in text and "parameters" in text  # the project's own lines stay


def test_verbose_shows_lightnings_notices(tmp_path, caplog) -> None:
    import pytorch_lightning as pl

    from proteinperformer.progress.lightning import lightning_notices_silenced

    caplog.set_level("INFO")
    for verbose in (False, True):
        caplog.clear()
        with lightning_notices_silenced(verbose):
            pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
        assert ("GPU available" in caplog.text) is verbose, caplog.text
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # the model table too
        assert compose("train", overrides=["verbose=true"]).trainer.enable_model_summary is True
        assert compose("train").trainer.enable_model_summary is False


def test_pp_embed_bar_counts_sequences_and_lightning_is_quiet(tiny_checkpoint, tmp_path, capfd) -> None:
    from proteinperformer import load_model
    from proteinperformer.inference.embed_files import predict_to_dir

    records = [(f"p{i}", "MKTAYIAKQR"[: 4 + i]) for i in range(5)]
    predict_to_dir(load_model(tiny_checkpoint), records, tmp_path / "out", toks_per_batch=20)
    out = capfd.readouterr()
    text = out.out + out.err
    assert not [n for n in LIGHTNING_NOTICES if n in text], text
    assert "embedding: 100%" in text and "5/5" in text and "?it/s" not in text, text
    assert len(list((tmp_path / "out").glob("*.pt"))) == 5


def test_pseudo_ll_states_its_estimate_first(tiny_checkpoint, capsys) -> None:
    from proteinperformer import load_model
    from proteinperformer.inference.score import pseudo_log_likelihoods

    model = load_model(tiny_checkpoint)
    seqs = ["MKTAYIAKQR", "MKTAYIAKQL", "MKTAYIAKQA"]
    loud = pseudo_log_likelihoods(model, seqs, progress=True, unit="mutant")
    err = capsys.readouterr().err
    assert err.startswith("pseudo-ll: 3 mutants x ") and " s per mutant ~ " in err.splitlines()[0], err
    np.testing.assert_array_equal(loud, pseudo_log_likelihoods(model, seqs))


def test_masked_lm_max_sequences_scores_that_many(tiny_checkpoint, tmp_path) -> None:
    from proteinperformer import load_model
    from proteinperformer.evaluation.card import masked_lm_scores

    rng = np.random.default_rng(0)
    fasta = tmp_path / "x.fasta"
    fasta.write_text("".join(f">P{i:05d}\nM{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 30))}\n"
                             for i in range(120)))
    model = load_model(tiny_checkpoint)
    full = masked_lm_scores(model, fasta, 0.2, 0.2, batch_size=4)
    part = masked_lm_scores(model, fasta, 0.2, 0.2, batch_size=4, max_sequences=6)
    for split in ("valid", "test"):
        assert full[split]["n_sequences"] > 8 and part[split]["n_sequences"] == 8  # whole batches: 2 x 4
        assert 0 < part[split]["n_masked"] < full[split]["n_masked"]
        assert part[split]["unigram"] == full[split]["unigram"]
