"""The command-line convention of docs/cli.md, checked on every pp-* parser (built, never run): one name for one
idea, help text on every option, old spellings accepted with a one-line note."""

from __future__ import annotations

import argparse
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = {name: target.split(":")[0] for name, target in SCRIPTS.items() if name != "pp-train"}  # Hydra
MODEL_COMMANDS = {"pp-embed", "pp-score", "pp-generate", "pp-probe", "pp-evaluate", "pp-convert", "pp-contacts",
                  "pp-attention-blosum"}
# Each idea has one spelling; the others must not appear on any command (they are hidden deprecated aliases).
RETIRED = {"--n-seqs", "--n-chains", "--max-train", "--blosum-n-seqs", "--max-len", "--min-len", "--layer",
           "--outdir", "--output", "--out-csv", "--num-threads", "--verbose-off"}


def parser(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[command]).create_parser()


def visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.help != argparse.SUPPRESS]


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in visible(p) for s in a.option_strings}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_description(command):
    p = parser(command)
    assert p.prog == command
    assert p.description and not p.description.startswith(("pp-", "`")), p.description
    missing = [a.option_strings or a.dest for a in visible(p) if not (a.help or "").strip()]
    assert not missing, f"{command}: options without help: {missing}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_one_name_for_one_idea(command):
    p = parser(command)
    opts = options(p)
    assert not opts & RETIRED, f"{command} shows retired spellings {opts & RETIRED}"
    assert {"--out", "--quiet", "--debug"} <= opts, f"{command}: every command writes to --out, has --quiet"
    assert not [a.dest for a in visible(p) if not a.option_strings and a.dest in ("out", "output", "outdir")]
    if command in MODEL_COMMANDS:
        assert {"--device", "--precision", "--threads"} <= opts, command
    for option in opts:  # subset sizes and length limits: only the convention's names
        if option.endswith(("-n-seqs", "-n-chains", "-max-train", "-max-len")):
            pytest.fail(f"{command}: {option} is not a convention name (--max-sequences, --crop-length, --max-length)")


def test_attention_options_on_every_model_command():
    """pp-contacts / pp-attention-blosum read the file's own attention maps, so they take no swap."""
    for command in MODEL_COMMANDS - {"pp-contacts", "pp-attention-blosum"}:
        assert {"--attention", "--kernel", "--num-features"} <= options(parser(command)), command


@pytest.mark.parametrize(("command", "argv", "dest", "value", "note"), [
    ("pp-attention-blosum", ["c", "f", "--n-seqs", "5"], "max_sequences", 5, "--max-sequences"),
    ("pp-attention-blosum", ["c", "f", "--max_len", "9"], "crop_length", 9, "--crop-length"),
    ("pp-contacts", ["c", "--n-chains", "3"], "max_sequences", 3, "--max-sequences"),
    ("pp-probe", ["c", "--train", "t", "--valid", "v", "--layer", "2"], "repr_layers", 2, "--repr-layers"),
    ("pp-preprocess", ["in.fasta", "--out", "s", "--max-len", "7"], "max_length", 7, "--max-length"),
    ("pp-evaluate", ["c", "--out", "o", "--location-max-train", "50"], "location_max_train", 50,
     "--location-max-sequences"),
    ("pp-embed", ["c", "f.fasta", "emb"], "out", Path("emb"), "--out emb"),
    ("pp-score", ["m", "d.csv", "s.csv", "--sequence", "MK"], "out", Path("s.csv"), "--out s.csv"),
    ("pp-generate", ["c", "s.fasta"], "out", Path("s.fasta"), "--out s.fasta"),
    ("pp-convert", ["src.pt", "dst.ckpt"], "out", Path("dst.ckpt"), "--out dst.ckpt"),
])
def test_old_spellings_still_work_with_a_note(command, argv, dest, value, note, capsys):
    args = parser(command).parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "deprecated" in err and note in err, err


def test_new_spellings_print_nothing_and_output_given_twice_is_an_error(capsys):
    args = parser("pp-embed").parse_args(["c", "f.fasta", "--out", "emb"])
    assert args.out == Path("emb") and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exc:
        parser("pp-embed").parse_args(["c", "f.fasta", "a", "--out", "b"])
    assert exc.value.code == 1 and "give the output once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser("pp-score").parse_args(["m", "d.csv", "--sequence", "MK"])
    assert "--out" in capsys.readouterr().err


def test_readme_has_the_convention_table():
    text = (ROOT / "README.md").read_text()
    for name in ("--out", "--max-sequences", "--crop-length", "--max-length", "--repr-layers", "--threads",
                 "--quiet", "--attention"):
        assert f"`{name}" in text, name
