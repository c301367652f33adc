"""Cases that used to end in exit 0 with a wrong or empty result, and the one-line errors that name the file and
what to do (issue 34). Tiny untrained models, no training: each test runs in about a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from proteinperformer.checkpoints import load_model, save_checkpoint
from proteinperformer.cli.embed import main as pp_embed
from proteinperformer.inference.embed import embed
from proteinperformer.inference.embed_files import read_embeddings
from proteinperformer.model import ModelConfig, PerformerLM, convert_attention

SEQS = [("a", "MKTAYIAKQRQISFVKSHF"), ("b", "GSHMSLFDFFKNKGSAMKT")]
DEPTH = 2
ROOT = Path(__file__).resolve().parents[1]


def tiny(path: Path, **config) -> Path:
    """An untrained 2-layer project checkpoint (a few kB)."""
    torch.manual_seed(0)
    cfg = dict(dim=16, depth=DEPTH, heads=2, ff_dim=32, num_features=8, max_positions=64) | config
    return save_checkpoint(PerformerLM(ModelConfig(**cfg)), path, "test")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def fasta(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fasta") / "p.fasta"
    path.write_text("".join(f">{label}\n{seq}\n" for label, seq in SEQS))
    return path


def error_line(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    text = str(exc.value.code) if isinstance(exc.value.code, str) else capsys.readouterr().err.strip()
    assert exc.value.code != 0 and "\n" not in text.strip(), text
    return text


# ---- layer keys: one convention for embed() and files ------------------------------------------------------------
def test_embed_and_files_key_layers_the_same_way(ckpt, fasta, tmp_path):
    model = load_model(ckpt)
    reps = embed(model, SEQS, layers=[0, -1], include=("mean",))
    assert sorted(reps["a"]["mean"]) == [0, DEPTH]  # absolute, as ESM and the files key them
    pp_embed([str(ckpt), str(fasta), "--out", str(tmp_path / "e"), "--repr-layers", "0", "-1"])
    files = read_embeddings(tmp_path / "e")  # format found in the folder
    assert sorted(files["a"]["mean_representations"]) == [0, DEPTH]
    for key in (-1, DEPTH):  # the README's [-1] works on both
        torch.testing.assert_close(files["a"]["mean_representations"][key], reps["a"]["mean"][key])
    with pytest.raises(KeyError, match="hold layers"):
        reps["a"]["mean"][1]


# ---- pp-embed into a folder that holds something else ------------------------------------------------------------
def test_rerun_with_other_options_refuses_then_overwrites(ckpt, fasta, tmp_path, capsys):
    out = tmp_path / "e"
    pp_embed([str(ckpt), str(fasta), "--out", str(out)])
    msg = error_line(capsys, pp_embed, [str(ckpt), str(fasta), "--out", str(out), "--include", "mean", "per_tok"])
    assert str(out) in msg and "--overwrite" in msg and "per_tok" in msg
    msg = error_line(capsys, pp_embed, [str(ckpt), str(fasta), "--out", str(out), "--repr-layers", "0"])
    assert "--repr-layers 2" in msg and "--repr-layers 0" in msg
    pp_embed([str(ckpt), str(fasta), "--out", str(out), "--include", "mean", "per_tok", "--overwrite"])
    got = read_embeddings(out)
    assert set(got) == {"a", "b"} and got["a"]["representations"][-1].shape == (len(SEQS[0][1]), 16)
    capsys.readouterr()
    pp_embed([str(ckpt), str(fasta), "--out", str(out), "--include", "per_tok", "mean"])  # same settings: resumes
    assert "2 already in" in capsys.readouterr().out


def test_read_embeddings_refuses_missing_empty_and_other_format(ckpt, fasta, tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        read_embeddings(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no pp-embed output"):
        read_embeddings(tmp_path / "empty")
    pp_embed([str(ckpt), str(fasta), "--out", str(tmp_path / "h"), "--format", "h5"])
    with pytest.raises(ValueError, match="holds h5 embeddings, not pt"):
        read_embeddings(tmp_path / "h", "pt")
    assert set(read_embeddings(tmp_path / "h")) == {"a", "b"}


# ---- pp-convert: the kernel that approximates an exact-attention source --------------------------------------------
def test_exact_source_converts_to_the_softmax_kernel(tmp_path):
    src = tiny(tmp_path / "exact.ckpt", attention="exact")  # config.kernel keeps the default "relu", unused
    from proteinperformer.cli.convert import main as pp_convert

    pp_convert([str(src), "--out", str(tmp_path / "f.ckpt")])
    assert load_model(tmp_path / "f.ckpt").config.kernel == "softmax"
    assert convert_attention(load_model(src), "favor").config.kernel == "softmax"
    favor = tiny(tmp_path / "favor.ckpt")  # a FAVOR+ (relu) source keeps its own kernel
    assert convert_attention(load_model(favor), "exact").config.kernel == "relu"


# ---- pp-attention-blosum: skipped sequences are named, an undefined r says why -------------------------------------
def test_attention_blosum_names_short_sequences_and_explains_nan(ckpt, tmp_path, capsys):
    from proteinperformer.cli.attention_blosum import main as pp_blosum

    fasta = tmp_path / "mix.fasta"
    fasta.write_text(">tiny1\nMKT\n>tiny2\nGSHM\n>long1\n" + "ACDEFGHIKLMNPQRSTVWY" * 3 + "\n")
    pp_blosum([str(ckpt), str(fasta), "--out", str(tmp_path / "b"), "--quiet"])
    out = capsys.readouterr().out
    assert "1 sequences" in out and "2 shorter than 30 residues skipped: tiny1, tiny2" in out
    assert "undefined: 0/4 heads have >= 100 edges" in out and "nan" not in out.split("vig")[1].split("\n")[0]
    only_short = tmp_path / "short.fasta"
    only_short.write_text(">tiny1\nMKT\n")
    msg = error_line(capsys, pp_blosum, [str(ckpt), str(only_short), "--out", str(tmp_path / "c")])
    assert str(only_short) in msg and "30 residues" in msg


# ---- probes: a small training subset is stratified ----------------------------------------------------------------
def test_location_subsample_keeps_every_label():
    from proteinperformer.evaluation.probe import ProbeDataError, read_tables

    train_csv, valid_csv = ROOT / "data/probes/deeploc/train.csv", ROOT / "data/probes/deeploc/valid.csv"
    task, full, valid, _, _ = read_tables(train_csv, valid_csv)
    for seed in range(3):  # pp-evaluate --location-max-sequences 50 aborted here before
        _, train, _, _, _ = read_tables(train_csv, valid_csv, max_train=50, seed=seed)
        assert len(train) == 50 and set(train.location) == set(full.location) >= set(valid.location)
    with pytest.raises(ProbeDataError, match="fewer than the 10 labels"):
        read_tables(train_csv, valid_csv, max_train=5)


# ---- errors: one line that names the file and what to do ----------------------------------------------------------
def test_csv_and_output_errors_name_the_file(ckpt, tmp_path, capsys):
    from proteinperformer.cli.probe import main as pp_probe
    from proteinperformer.cli.score import main as pp_score

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    msg = error_line(capsys, pp_score, [str(ckpt), str(empty), "--out", str(tmp_path / "s.csv"), "--sequence", "MK"])
    assert f"{empty}: empty (no header line)" in msg
    msg = error_line(capsys, pp_probe, [str(ckpt), "--train", str(empty), "--valid", str(empty)])
    assert f"{empty}: empty (no header line)" in msg
    msg = error_line(capsys, pp_probe, [str(ckpt), "--train", str(tmp_path), "--valid", str(empty)])
    assert f"{tmp_path}: is a folder; give the probe CSV" in msg
    dms = tmp_path / "dms.csv"
    dms.write_text("mutant,fit\nM1A,0.5\n")
    # the output is checked first: before the CSV is read and before the (here missing) model is loaded
    msg = error_line(capsys, pp_score, ["missing.ckpt", str(dms), "--out", str(tmp_path), "--sequence", "MK"])
    assert f"{tmp_path}: is a folder; give --out a file path" in msg


def test_structures_truncated_checkpoint_and_esm_file_errors(ckpt, fasta, tmp_path, capsys):
    from proteinperformer.checkpoints import CheckpointError
    from proteinperformer.cli.contacts import main as pp_contacts

    msg = error_line(capsys, pp_contacts, [str(ckpt), "--structures", str(fasta), "--out", str(tmp_path / "c")])
    assert f"{fasta}: not an .npz of chains in the pdb_chains.npz layout" in msg
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"cut.ckpt: not a readable torch checkpoint; truncated.*copy it again$"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match=r"hub/checkpoints/ \(esm.pretrained.esm2_t6_8M_UR50D\(\) fetches"):
        load_model(tmp_path / "esm2_t6_8M_UR50D.pt")
    msg = error_line(capsys, pp_embed, [str(ckpt), str(fasta), "--out", str(tmp_path / "e"), "--include", "contacts",
                                        "--contact-head", str(tmp_path / "contact_head.json")])
    assert "no such contact head; run pp-contacts" in msg


def test_generate_past_learned_positions_suggests_max_length(tmp_path, capsys):
    from proteinperformer.cli.generate import main as pp_generate

    clm = tiny(tmp_path / "clm.ckpt", causal=True, max_positions=16)
    msg = error_line(capsys, pp_generate, [str(clm), "--out", str(tmp_path / "s.fasta"), "--max-length", "40"])
    assert "past the 16 positions this model learned; give --max-length 16 or less" in msg
    pp_generate([str(clm), "--out", str(tmp_path / "s.fasta"), "--max-length", "16", "--num-samples", "2"])


def test_train_override_typo_is_one_line_with_the_close_keys():
    from proteinperformer.cli.train import check_overrides

    check_overrides(["experiment=tiny", "trainer.max_steps=5"])  # valid: nothing happens
    with pytest.raises(SystemExit) as exc:
        check_overrides(["experiment=tiny", "trainer.max_step=5"])
    assert str(exc.value.code).startswith("error: trainer.max_step=5: the config has no key trainer.max_step; "
                                          "did you mean trainer.max_steps")
