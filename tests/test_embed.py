"""Embedding API and pp-embed CLI: strict loading, layers, batch == single, long inputs, files, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from proteinperformer.checkpoints import CheckpointError, export_slim, load_model
from proteinperformer.cli.embed import main
from proteinperformer.data.fasta import FastaFormatError
from proteinperformer.inference.embed import SequenceTooLongError, batch_indices, embed
from proteinperformer.inference.embed_files import read_embeddings, safe_name
from proteinperformer.tokenizer import Alphabet, TokenizationError
from proteinperformer.training.lm import ProteinLM

SEQS = [
    ("short", "MKT"),
    ("mid", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"),
    ("long", "ACDEFGHIKLMNPQRSTVWY" * 6 + "XBZUO"),
    ("other", "GSHMSLFDFFKNKGSA"),
]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def _fake_checkpoint(path: Path, **config) -> Path:
    """A checkpoint with the layout ProteinLM/Lightning writes, from an untrained model."""
    lm = ProteinLM(config=dict(dim=16, depth=2, heads=2, ff_dim=32, num_features=8, **config))
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "alphabet": Alphabet().all_toks, "optimizer_states": [{"big": torch.zeros(1000)}]}, path)
    return path


def _edit(src: Path, dst: Path, fn) -> Path:
    ckpt = torch.load(src, weights_only=True)
    fn(ckpt)
    torch.save(ckpt, dst)
    return dst


# ---- loading ------------------------------------------------------------------------------------
def test_load_model_rebuilds_config(model, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert model.config.to_dict() == ckpt["hyper_parameters"]["config"]
    assert not model.training
    assert torch.equal(model.embed_tokens.weight, ckpt["state_dict"]["model.embed_tokens.weight"])


def test_load_model_errors_name_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(tmp_path / "text.ckpt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a proteinperformer checkpoint: missing \['state_dict'"):
        load_model(tmp_path / "other.pt")
    extra = _edit(tiny_checkpoint, tmp_path / "extra.ckpt", lambda c: c["state_dict"].update(
        {"model.extra.weight": torch.zeros(1), "head.bias": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['head.bias', 'model.extra.weight'\]"):
        load_model(extra)
    missing = _edit(tiny_checkpoint, tmp_path / "missing.ckpt",
                    lambda c: c["state_dict"].pop("model.layers.1.mlp.fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \['model.layers.1.mlp.fc.weight'\]"):
        load_model(missing)
    wrong = _edit(tiny_checkpoint, tmp_path / "wrong.ckpt", lambda c: c["hyper_parameters"]["config"].update(dim=64))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(wrong)
    alpha = _edit(tiny_checkpoint, tmp_path / "alpha.ckpt", lambda c: c.update(alphabet=["A", "B"]))
    with pytest.raises(CheckpointError, match="alphabet"):
        load_model(alpha)


def test_export_slim_drops_optimizer_and_loads(tiny_checkpoint, model, tmp_path):
    slim = export_slim(tiny_checkpoint, tmp_path / "slim.ckpt")
    ckpt = torch.load(slim, weights_only=True)
    assert set(ckpt) <= {"state_dict", "hyper_parameters", "datamodule_hyper_parameters", "alphabet",
                         "pytorch-lightning_version", "epoch",
                         "global_step"}
    assert slim.stat().st_size < tiny_checkpoint.stat().st_size
    a = embed(load_model(slim), SEQS[:2])
    b = embed(model, SEQS[:2])
    assert torch.equal(a["mid"]["mean"][-1], b["mid"]["mean"][-1])
    assert not list(tmp_path.glob("*.tmp"))


# ---- embedding ----------------------------------------------------------------------------------
def test_embed_shapes_layers_and_kinds(model):
    depth, dim = model.config.depth, model.config.dim
    reps = embed(model, SEQS, layers=[0, -1, 1, depth], include=("mean", "per_tok", "bos"))
    assert list(reps) == [label for label, _ in SEQS]
    for label, seq in SEQS:
        r = reps[label]
        assert set(r) == {"mean", "per_tok", "bos"}
        assert set(r["per_tok"]) == {0, 1, depth}  # keyed by absolute layer, as ESM and the files key them
        assert r["per_tok"][-1].shape == (len(seq), dim)
        assert r["mean"][-1].shape == r["bos"][-1].shape == (dim,)
        torch.testing.assert_close(r["mean"][1], r["per_tok"][1].mean(0))
        assert torch.equal(r["per_tok"][-1], r["per_tok"][depth])
    # layer 0 is the token + position embedding of the residues (row 0 is <cls>)
    tokens = Alphabet().get_batch_converter()([SEQS[1]])[2]
    torch.testing.assert_close(reps["mid"]["per_tok"][0], model.embed(tokens)[0, 1:-1])
    with pytest.raises(ValueError, match="out of range"):
        embed(model, SEQS, layers=[depth + 1])
    with pytest.raises(ValueError, match="include"):
        embed(model, SEQS, include=("contacts",))


def test_batch_equals_single(model):
    batched = embed(model, SEQS, layers=[0, 1, -1], include=("mean", "per_tok", "bos"), toks_per_batch=10_000)
    assert len(batch_indices([len(s) for _, s in SEQS], 10_000)) == 1  # really one padded batch
    for label, seq in SEQS:
        alone = embed(model, [(label, seq)], layers=[0, 1, -1], include=("mean", "per_tok", "bos"))[label]
        for kind in alone:
            for layer in alone[kind]:
                assert (alone[kind][layer] - batched[label][kind][layer]).abs().max() <= 1e-5, (label, kind, layer)


def test_input_forms_agree(model, tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{label} some description\n{seq}\n" for label, seq in SEQS))
    as_list = embed(model, SEQS)
    for other in (dict(SEQS), fasta, str(fasta)):
        got = embed(model, other)
        assert list(got) == list(as_list)
        for label in got:
            assert torch.equal(got[label]["mean"][-1], as_list[label]["mean"][-1])


def test_bad_inputs_are_named(model, tmp_path):
    with pytest.raises(ValueError, match=r"duplicate label 'mid' at items 1 and 2"):
        embed(model, [SEQS[0], SEQS[1], ("mid", "MKV")])
    with pytest.raises(TokenizationError, match=r"'mid'.*position 3"):
        embed(model, [("mid", "MK1T")])
    fasta = tmp_path / "dup.fasta"
    fasta.write_text(">a\nMKT\n>b\nMKV\n>a\nMKW\n")
    with pytest.raises(FastaFormatError, match=r"dup.fasta:5: duplicate id 'a'"):
        embed(model, fasta)


def test_batch_indices_respect_budget():
    lengths = [5, 300, 40, 41, 7, 1000, 39, 3]
    batches = batch_indices(lengths, toks_per_batch=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] + 2 for i in b) * len(b) <= 100
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order)  # length-sorted packing
    assert [5] in batches and [1] in batches  # too long for the budget: alone


def test_long_sequence_single_pass(model):
    seq = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVV" * 72)[:5000]
    reps = embed(model, [("titin_piece", seq)], include=("mean", "per_tok"), toks_per_batch=1024)
    per_tok = reps["titin_piece"]["per_tok"][-1]
    assert per_tok.shape == (5000, model.config.dim)
    assert torch.isfinite(per_tok).all()


def test_learned_positions_limit_truncate_and_chunk(tmp_path):
    model = load_model(_fake_checkpoint(tmp_path / "learned.ckpt", positions="learned", max_positions=34))
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV"  # 40 residues > 32
    with pytest.raises(SequenceTooLongError, match=r"'x' has 40 residues but this model takes at most 32.*--truncate"):
        embed(model, [("x", seq)])
    trunc = embed(model, [("x", seq)], include=("per_tok",), on_long="truncate")["x"]["per_tok"][-1]
    head = embed(model, [("x", seq[:32])], include=("per_tok", "bos"))["x"]
    assert torch.equal(trunc, head["per_tok"][-1])
    chunk = embed(model, [("x", seq), ("y", "MKV")], include=("per_tok", "bos"), on_long="chunk")["x"]
    assert chunk["per_tok"][-1].shape == (40, 16)
    # windows [0, 32) and [8, 40): residues 0..7 are seen by the first window only, and bos comes from it
    torch.testing.assert_close(chunk["per_tok"][-1][:8], head["per_tok"][-1][:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunk["bos"][-1], head["bos"][-1], atol=1e-5, rtol=0)
    tail = embed(model, [("x", seq[8:])], include=("per_tok",))["x"]["per_tok"][-1]
    torch.testing.assert_close(chunk["per_tok"][-1][32:], tail[24:], atol=1e-5, rtol=0)
    exact = load_model(_fake_checkpoint(tmp_path / "exact.ckpt", positions="sinusoidal", attention="exact",
                                        max_positions=34))
    with pytest.raises(SequenceTooLongError, match="exact attention"):
        embed(exact, [("x", seq)])


# ---- CLI ----------------------------------------------------------------------------------------
def _fasta(path: Path, records) -> Path:
    path.write_text("".join(f">{label}\n{seq}\n" for label, seq in records))
    return path


def test_cli_pt_like_esm_extract(tiny_checkpoint, model, tmp_path, capsys):
    records = [("sp|P1|X_HUMAN", "MKTAYIAKQR"), ("weird/label x", "GSHMSLFDFF"), (".hidden", "ACDEFG")]
    fasta = _fasta(tmp_path / "in.fasta", records[:2])
    out = tmp_path / "out"
    args = [str(tiny_checkpoint), str(fasta), str(out), "--repr-layers", "0", "-1", "--include", "mean", "per_tok",
            "bos", "--toks-per-batch", "20"]
    main(args)
    depth = model.config.depth
    saved = torch.load(out / "P1.pt", weights_only=True)  # the FASTA parser keeps the UniProt accession
    assert saved["label"] == "P1"
    assert set(saved) == {"label", "mean_representations", "representations", "bos_representations"}
    assert set(saved["representations"]) == {0, depth}  # -1 written as depth, as esm-extract does
    expected = embed(model, [("P1", "MKTAYIAKQR")], layers=[-1], include=("per_tok",))["P1"]["per_tok"][-1]
    torch.testing.assert_close(saved["representations"][depth], expected, atol=1e-5, rtol=0)
    # resume: the two done labels are skipped, only the new (unsafe) one is embedded
    _fasta(fasta, records)
    capsys.readouterr()
    main(args)
    assert "2 already in" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["%2Ehidden.pt", "P1.pt", "pp_embed.json", "weird%2Flabel.pt"]
    assert safe_name("a/b c|.") == "a%2Fb%20c%7C."


@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_cli_single_file_formats_resume(tiny_checkpoint, model, tmp_path, fmt):
    fasta = _fasta(tmp_path / "in.fasta", SEQS[:2])
    out = tmp_path / "out"
    args = [str(tiny_checkpoint), str(fasta), str(out), "--format", fmt, "--include", "mean", "per_tok"]
    main(args)
    _fasta(fasta, SEQS)
    main(args)  # adds the other two to the same file
    got = read_embeddings(out, fmt)
    assert sorted(got) == sorted(label for label, _ in SEQS)
    # npz: parts merged and removed; h5: the shards stay, linked from embeddings.h5
    assert sorted(p.name for p in out.iterdir()) == [f"embeddings.{fmt}", "pp_embed.json"] + (
        ["shards"] if fmt == "h5" else [])
    ref = embed(model, SEQS, include=("mean", "per_tok"))
    depth = model.config.depth
    for label, _ in SEQS:
        torch.testing.assert_close(got[label]["mean_representations"][depth], ref[label]["mean"][-1],
                                   atol=1e-5, rtol=0)
        assert got[label]["representations"][depth].shape == ref[label]["per_tok"][-1].shape


def test_cli_h5_interrupted_run_resumes_to_the_straight_run(tiny_checkpoint, model, tmp_path, monkeypatch, capsys):
    """A run killed between writing a batch's arrays and indexing its labels resumes to the straight run's content;
    the resume reads only the label index."""
    import h5py

    from proteinperformer.inference import embed_h5

    records = [(f"p{i}", "ACDEFGHIKLMNPQRSTVWY"[i % 20:] + "MKV" * (i % 7)) for i in range(24)]
    fasta = _fasta(tmp_path / "in.fasta", records)
    args = ["--include", "mean", "per_tok", "bos", "--repr-layers", "0", "-1", "--toks-per-batch", "120", "--format",
            "h5"]
    main([str(tiny_checkpoint), str(fasta), str(tmp_path / "straight"), *args])
    calls = {"labels": 0}
    real = embed_h5.ShardWriter._append

    def killed_on_third_index(self, name, rows):
        if name == "labels":
            calls["labels"] += 1
            if calls["labels"] == 3:
                raise RuntimeError("killed")
        return real(self, name, rows)

    monkeypatch.setattr(embed_h5.ShardWriter, "_append", killed_on_third_index)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        main([str(tiny_checkpoint), str(fasta), str(out), *args, "--debug"])
    monkeypatch.setattr(embed_h5.ShardWriter, "_append", real)
    (shard,) = embed_h5.shard_paths(out)
    with h5py.File(shard) as f:
        n_indexed = f["labels"].shape[0]
        assert f[f"mean/{model.config.depth}"].shape[0] > n_indexed > 0  # 3rd batch: arrays written, not indexed
    read_arrays = []
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key, real=h5py.Dataset.__getitem__: (
        read_arrays.append(self.name), real(self, key))[1])
    capsys.readouterr()
    main([str(tiny_checkpoint), str(fasta), str(out), *args])
    assert f"{n_indexed} already in" in capsys.readouterr().out
    assert set(read_arrays) == {"/labels", "/lengths"}  # resume and link read the index, never an array
    monkeypatch.undo()
    want, got = read_embeddings(tmp_path / "straight", "h5"), read_embeddings(out, "h5")
    assert sorted(got) == sorted(want) == sorted(label for label, _ in records)
    for label in want:
        for key in ("mean_representations", "bos_representations", "representations"):
            assert sorted(got[label][key]) == [0, model.config.depth]
            for layer in (0, model.config.depth):
                torch.testing.assert_close(got[label][key][layer], want[label][key][layer], atol=1e-5, rtol=0)
    assert len(embed_h5.shard_paths(out)) == 2


def test_cli_h5_float16_header_labels_and_length_check_up_front(tiny_checkpoint, model, tmp_path):
    fasta = _fasta(tmp_path / "in.fasta", [("sp|P1|X_HUMAN desc", "MKTAYIAKQR"), ("b two", "GSHMSLFDFF")])
    out = tmp_path / "out"
    main([str(tiny_checkpoint), str(fasta), str(out), "--format", "h5", "--dtype", "float16", "--label", "header"])
    got = read_embeddings(out, "h5")
    assert sorted(got) == ["b two", "sp|P1|X_HUMAN desc"]
    mean = got["b two"]["mean_representations"][model.config.depth]
    assert mean.dtype == torch.float16
    torch.testing.assert_close(mean.float(), embed(model, [("b", "GSHMSLFDFF")])["b"]["mean"][-1], atol=2e-3, rtol=0)
    # learned positions: too-long sequences stop the run before any embedding, every id listed
    ckpt = _fake_checkpoint(tmp_path / "learned.ckpt", max_positions=12)
    long_fasta = _fasta(tmp_path / "long.fasta", [("ok", "MKV"), ("L1", "A" * 11), ("L2", "M" * 30)])
    with pytest.raises(SystemExit, match=r"^error: .*long.fasta: 2 sequence\(s\) longer than the 10 residues .*"
                                         r"L1 \(11\), L2 \(30\); nothing was embedded"):
        main([str(ckpt), str(long_fasta), str(tmp_path / "o2"), "--format", "h5"])
    assert not (tmp_path / "o2" / "shards").exists()
    dup = _fasta(tmp_path / "dup.fasta", [("a", "MKV"), ("b", "MKV"), ("a", "GGG")])
    with pytest.raises(SystemExit, match=r"^error: .*dup.fasta:5: duplicate label 'a' \(first at line 1\)"):
        main([str(ckpt), str(dup), str(tmp_path / "o3"), "--format", "h5"])


@pytest.mark.slow
def test_cli_two_process_ddp_matches_single(tiny_checkpoint, model, tmp_path):
    """--devices 2 on CPU: Lightning launches a second rank (DDP, gloo); each rank streams its share of the FASTA to
    its own h5 shard, and the shards of both ranks are linked into one embeddings.h5."""
    import subprocess
    import sys

    fasta = _fasta(tmp_path / "in.fasta", SEQS)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "proteinperformer.cli.embed", str(tiny_checkpoint), str(fasta), str(out), "--format",
           "h5", "--devices", "2", "--toks-per-batch", "40"]  # small budget: several batches, split over ranks
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    assert sorted(p.name[:5] for p in (out / "shards").iterdir()) == ["rank0", "rank1"]
    got = read_embeddings(out, "h5")
    ref = embed(model, SEQS)
    assert sorted(got) == sorted(ref)
    for label in ref:
        torch.testing.assert_close(got[label]["mean_representations"][model.config.depth], ref[label]["mean"][-1],
                                   atol=1e-5, rtol=0)
