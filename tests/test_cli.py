"""Every pp-* command behaves alike: a bad or unsafe checkpoint, a bad input file or a bad option ends in one
line ``error: ...`` with exit code 1 (no traceback, no code run); dashed options with underscore aliases;
``--device`` takes torch device strings; progress suits a log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proteinperformer.cli import attention_blosum, contacts, convert, embed, evaluate, generate, gpu_check, preprocess
from proteinperformer.cli import probe as probe_cli
from proteinperformer.cli import score as score_cli
from proteinperformer.cli.common import Parser
from proteinperformer.inference.embed_files import lightning_device
from proteinperformer.model.precision import PrecisionError, resolve_device
from tests.conftest import ROOT, SAMPLE_FASTA

PROBES = ROOT / "data" / "probes"


class RunsCode:
    """Pickles as a call that would create ``marker`` if the file were ever unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.fixture
def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Two files no command may load: random bytes, and a torch checkpoint whose pickle would run code."""
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(os.urandom(4096))
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"w": RunsCode(tmp_path / "MARKER")}, "hyper_parameters": {}}, code)
    return {"random": random_bytes, "code": code}


def _argv(tool: str, ckpt: Path, tmp_path: Path) -> list[str]:
    return {
        "pp-embed": [str(ckpt), str(SAMPLE_FASTA), "--out", str(tmp_path / "emb")],
        "pp-generate": [str(ckpt), "--out", str(tmp_path / "out.fasta")],
        "pp-probe": [str(ckpt), "--train", str(PROBES / "fold_class/train.csv"),
                     "--valid", str(PROBES / "fold_class/valid.csv"), "--out", str(tmp_path / "p.json")],
        "pp-evaluate": [str(ckpt), "--out", str(tmp_path / "card"),
                        "--skip", "ss3", "location", "go_mf", "fold_class", "blosum", "contacts"],
        "pp-convert": [str(ckpt), "--out", str(tmp_path / "converted.ckpt")],
        "pp-contacts": [str(ckpt), "--out", str(tmp_path / "contacts")],
        "pp-attention-blosum": [str(ckpt), str(SAMPLE_FASTA), "--out", str(tmp_path / "blosum")],
        "pp-score": [str(ckpt), str(ROOT / "data/dms/BLAT_ECOLX_Ranganathan2015.csv"),
                     "--out", str(tmp_path / "scored.csv"), "--fasta", str(ROOT / "data/dms/BLAT_ECOLX.fasta"),
                     "--offset-idx", "24", "--no-baselines"],
    }[tool]


MAINS = {"pp-embed": embed.main, "pp-generate": generate.main, "pp-probe": probe_cli.main,
         "pp-evaluate": evaluate.main, "pp-convert": convert.main, "pp-contacts": contacts.main,
         "pp-attention-blosum": attention_blosum.main, "pp-score": score_cli.main}


@pytest.mark.parametrize("kind", ["random", "code"])
@pytest.mark.parametrize("tool", sorted(MAINS))
def test_bad_checkpoint_is_one_line_error_and_runs_no_code(tool, kind, bad_checkpoints, tmp_path) -> None:
    ckpt = bad_checkpoints[kind]
    with pytest.raises(SystemExit) as exit_info:
        MAINS[tool](_argv(tool, ckpt, tmp_path))
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {ckpt}: ") and "\n" not in message, message
    expected = "refusing to run code" if kind == "code" else "not a readable torch checkpoint"
    assert expected in message
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", ["init_from", "ckpt_path"])
def test_pp_train_bad_checkpoint_is_one_line_error(kind, bad_checkpoints, tmp_path) -> None:
    ckpt = bad_checkpoints["code" if kind == "ckpt_path" else "random"]
    proc = subprocess.run([sys.executable, "-m", "proteinperformer.cli.train", f"{kind}={ckpt}", "experiment=tiny",
                           f"hydra.run.dir={tmp_path / 'run'}", "logger=csv"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt}: "), proc.stderr
    assert not (tmp_path / "MARKER").exists()


def test_console_command_prints_exactly_one_line(bad_checkpoints, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "proteinperformer.cli.generate", str(bad_checkpoints["code"]), "--out",
                           str(tmp_path / "x.fasta")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "x.fasta").exists()


def test_debug_shows_the_traceback(bad_checkpoints, tmp_path) -> None:
    from proteinperformer.checkpoints import CheckpointError

    with pytest.raises(CheckpointError):
        generate.main([str(bad_checkpoints["random"]), str(tmp_path / "x.fasta"), "--debug"])


def test_bad_fasta_and_bad_option_are_one_line(tmp_path, capsys) -> None:
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">p1\nMKT1AY\n")
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main([str(fasta), "--out", str(tmp_path / "store"), "--quiet"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {fasta}:1: record 'p1'") and "line 2" in message and "\n" not in message
    for main in (preprocess.main, gpu_check.main, embed.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--no-such-option"])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_underscore_spellings_are_the_dashed_options() -> None:
    parser = Parser(prog="x")
    parser.add_argument("--max-length", type=int, default=1)
    parser.add_argument("--repr-layers", type=int, nargs="+")
    assert parser.parse_args(["--max_length", "5", "--repr_layers", "0", "-1"]) == \
        parser.parse_args(["--max-length=5", "--repr-layers", "0", "-1"])
    assert parser.parse_args(["--max_length=7"]).max_length == 7
    for tool in (generate, embed, probe_cli, convert, contacts, attention_blosum, evaluate):  # dashes only
        options = [o for a in tool.create_parser()._actions for o in a.option_strings if o.startswith("--")]
        assert all("_" not in o for o in options), (tool.__name__, options)
        assert "--device" in options and tool.create_parser().get_default("device") == "auto", tool.__name__


def test_device_strings() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PrecisionError, match="no CUDA device"):
            resolve_device("cuda:1")
    assert lightning_device(torch.device("cuda:1")) == ("gpu", [1])
    assert lightning_device(torch.device("cuda"), 4) == ("gpu", 4)
    assert lightning_device(torch.device("cpu"), 2) == ("cpu", 2)
    with pytest.raises(ValueError, match="names one GPU"):
        lightning_device(torch.device("cuda:1"), 2)


def test_progress_in_a_log_file_is_one_line_per_update(monkeypatch) -> None:
    from proteinperformer import progress

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress.lines, "LOG_EVERY_SECONDS", 0.0)
    for _ in progress.track(range(5), desc="work", total=5):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") >= 2 and "5/5" in text.splitlines()[-1], repr(text)
    assert isinstance(progress.progress_bar(), progress.LogLineProgressBar)  # pytest's stdout is not a terminal


def test_pp_convert_keeps_the_source_kernel(tiny_checkpoint, tmp_path) -> None:
    from proteinperformer import load_model

    source = load_model(tiny_checkpoint)
    assert source.config.kernel == "relu"
    convert.main([str(tiny_checkpoint), str(tmp_path / "same.ckpt"), "--attention", "favor"])
    assert load_model(tmp_path / "same.ckpt").config.kernel == "relu"
    convert.main([str(tiny_checkpoint), str(tmp_path / "exact.ckpt"), "--attention", "exact"])
    assert load_model(tmp_path / "exact.ckpt").config.kernel == "relu"


def test_pp_evaluate_scores_the_checkpoints_own_split(tiny_checkpoint) -> None:
    import argparse

    from proteinperformer.evaluation.card import TRAINING_SPLIT, resolve_split, training_record

    record = training_record(tiny_checkpoint)  # conftest trains with data.valid_frac=0.1
    assert record["split"] == {"valid_frac": 0.1, "test_frac": 0.05, "split_seed": 0}
    args = argparse.Namespace(valid_frac=None, test_frac=None, split_seed=None)
    assert resolve_split(args, record) == (record["split"], "the checkpoint's training config")
    assert resolve_split(args, {}) == (TRAINING_SPLIT, "the training defaults")
    args.test_frac = 0.2
    split, source = resolve_split(args, record)
    assert split == {"valid_frac": 0.1, "test_frac": 0.2, "split_seed": 0}
    assert source == "the command line over the checkpoint's training config"


def test_training_progress_in_a_log_and_switched_off(tmp_path, capsys) -> None:
    from proteinperformer.training.train import train
    from tests.conftest import tiny_config

    short = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    train(tiny_config(tmp_path / "quiet", [*short, "trainer.enable_progress_bar=false"]))  # Lightning refused this
    quiet = capsys.readouterr().out
    assert not [line for line in quiet.splitlines() if line.startswith("step ")]
    train(tiny_config(tmp_path / "log", short))
    log = capsys.readouterr().out
    lines = [line for line in log.splitlines() if line.startswith("step ")]
    assert "\r" not in log, [line for line in log.split("\n") if "\r" in line]
    assert lines and lines[-1].startswith("step 4/4 (100%) epoch 0 | "), log
    assert any("val/ppl" in line for line in lines)
