"""pp-convert: an ESM-2 file becomes a FAVOR+ project checkpoint that load_model, embed() and train.py init_from
use; --report measures FAVOR+ against exact attention; --slim drops a training checkpoint's optimiser state."""

import json
import math
from pathlib import Path

import pytest
import torch

from proteinperformer.checkpoints import load_model, read_torch
from proteinperformer.cli import convert
from proteinperformer.evaluation.conversion import report
from proteinperformer.inference.embed import embed
from proteinperformer.model import convert_attention
from proteinperformer.training.train import _init_weights_from, _instantiate_model, train
from tests.conftest import tiny_config
from tests.test_esm_import import SEQS, write_fair_esm


@pytest.fixture(scope="module")
def esm_file(tmp_path_factory) -> Path:
    return write_fair_esm(tmp_path_factory.mktemp("esm"), layers=2, dim=32, heads=4, scale=0.02)[0]


def test_convert_writes_a_favor_checkpoint_that_loads_and_embeds(esm_file, tmp_path):
    out = tmp_path / "favor.ckpt"
    convert.main([str(esm_file), str(out), "--attention", "favor", "--num-features", "64", "--seed", "3"])
    model = load_model(out)
    cfg = model.config
    assert (cfg.attention, cfg.kernel, cfg.num_features, cfg.alphabet, cfg.positions) == (
        "favor", "softmax", 64, "esm", "rotary")
    want = convert_attention(load_model(esm_file), "favor", 64, "softmax", seed=3)
    tokens = model.alphabet.get_batch_converter()(SEQS)[2]
    with torch.no_grad():
        assert torch.equal(model(tokens)["logits"], want(tokens)["logits"])  # weights and draw as converted
    reps = embed(model, SEQS, include=("per_tok",))
    assert reps["b"]["per_tok"][-1].shape == (len(SEQS[1][1]), 32)


def test_init_from_fine_tunes_the_converted_model_with_its_alphabet(esm_file, tmp_path):
    out = tmp_path / "favor.ckpt"
    convert.main([str(esm_file), str(out), "--num-features", "32"])
    cfg = tiny_config(tmp_path / "run", [f"init_from={out}", "trainer.max_steps=3"])
    net = _init_weights_from(cfg)
    assert cfg.model.config.alphabet == "esm" and cfg.data.alphabet == "esm"  # data follows the model
    lm = _instantiate_model(cfg, net)
    for k, v in net.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    metrics = train(tiny_config(tmp_path / "run2", [f"init_from={out}", "trainer.max_steps=3"]))
    assert metrics["global_step"] == 3 and math.isfinite(metrics["val_ppl"])
    tuned = load_model(metrics["last_checkpoint"])
    assert tuned.config.alphabet == "esm" and tuned.config.dim == 32
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, net.state_dict()[k])]
    assert "layers.0.attn.qkv.weight" in changed  # fine-tuned from the converted weights


def test_report_measures_favor_against_exact(esm_file, tmp_path):
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text("".join(f">{label}\n{seq}\n" for label, seq in SEQS))
    few = report(esm_file, fasta, num_features=16, draws=2)
    many = report(esm_file, fasta, num_features=1024, draws=2)
    assert few["sequences"] == 3 and len(few["layer_rel_error_mean"]) == 2
    assert all(0 < e < 1 for e in few["layer_rel_error_mean"])
    assert all(m < f for m, f in zip(many["layer_rel_error_mean"], few["layer_rel_error_mean"], strict=True))
    assert few["exact_acc"] == many["exact_acc"] and few["exact_ppl"] == many["exact_ppl"]
    assert abs(many["favor_ppl"] - many["exact_ppl"]) < abs(few["favor_ppl"] - few["exact_ppl"]) + 1e-3


def test_report_scores_are_the_scorers_on_the_evaluation_masks(esm_file, tmp_path, capsys):
    """The report's exact-model numbers are score_batches on the evaluation collator's masks (seed = index of the
    sequence), one sequence per batch; pp-convert prints them."""
    from proteinperformer.training.scoring import evaluation_collator, score_batches

    fasta = tmp_path / "seqs.fasta"
    fasta.write_text("".join(f">{label}\n{seq}\n" for label, seq in SEQS))
    r = report(esm_file, fasta, num_features=16, draws=1)
    model = load_model(esm_file, attention="exact")
    collate = evaluation_collator(model.alphabet, causal=False)
    tokens = model.alphabet.get_batch_converter()(SEQS)[2]
    batches = [collate([{"tokens": t[: len(seq) + 2], "seed": i}]) for i, (t, (_, seq)) in enumerate(zip(
        tokens, SEQS, strict=True))]
    want = score_batches(model, batches, model.alphabet)
    assert r["masked_residues"] == want["residues"] == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert (r["exact_acc"], r["exact_ppl"]) == (want["accuracy"], want["perplexity"])
    assert all(int((b["input_ids"] == model.alphabet.mask_idx).sum()) == int((b["labels"] != -100).sum())
               for b in batches)  # every scored residue is replaced by <mask>
    convert.main([str(esm_file), "--report", str(fasta), "--num-features", "16", "--draws", "1"])
    assert f"masked-residue accuracy  exact {100 * want['accuracy']:.2f}%" in capsys.readouterr().out


def test_pp_embed_runs_on_a_fair_esm_file_unchanged(esm_file, tmp_path):
    from proteinperformer.cli.embed import main as pp_embed
    from proteinperformer.inference.embed_files import read_embeddings

    fasta = tmp_path / "seqs.fasta"
    fasta.write_text("".join(f">{label}\n{seq}\n" for label, seq in SEQS))
    pp_embed([str(esm_file), str(fasta), str(tmp_path / "out"), "--include", "per_tok", "mean"])
    out = read_embeddings(tmp_path / "out")
    direct = embed(load_model(esm_file), SEQS, include=("per_tok",))
    for label, seq in SEQS:
        assert out[label]["representations"][2].shape == (len(seq), 32)  # residues only, keyed by depth
        assert torch.allclose(out[label]["representations"][2], direct[label]["per_tok"][-1], atol=1e-5)


def test_pp_embed_attention_favor_on_a_fair_esm_file(esm_file, tmp_path):
    """pp-embed ESM2.pt --attention favor: the swap happens at load time, beyond ESM-2's 1,022-residue cap."""
    from proteinperformer.cli.embed import main as pp_embed
    from proteinperformer.inference.embed_files import read_embeddings

    long_seq = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 40)[:1300]
    fasta = tmp_path / "long.fasta"
    fasta.write_text(f">long\n{long_seq}\n>short\n{SEQS[0][1]}\n")
    torch.manual_seed(0)  # the FAVOR+ draw made at load time: the same whichever tests ran before
    pp_embed([str(esm_file), str(fasta), str(tmp_path / "favor"), "--attention", "favor", "--num-features", "64"])
    out = read_embeddings(tmp_path / "favor")
    assert out["long"]["mean_representations"][2].shape == (32,)
    exact = embed(load_model(esm_file), [("short", SEQS[0][1])])["short"]["mean"][-1]
    favor = out["short"]["mean_representations"][2]
    assert not torch.equal(favor, exact)  # FAVOR+ really ran
    assert ((favor - exact).norm() / exact.norm()).item() < 0.2


def test_slim_copy_loads_with_the_same_weights_and_no_optimiser_state(tiny_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"val_ppl": 12.5}))
    out = tmp_path / "slim.ckpt"
    convert.main(["--slim", str(tiny_checkpoint), str(out), "--metrics", str(metrics)])
    full, slim = read_torch(tiny_checkpoint), read_torch(out)
    assert "optimizer_states" in full and not {"optimizer_states", "lr_schedulers", "callbacks", "loops"} & set(slim)
    assert out.stat().st_size < tiny_checkpoint.stat().st_size
    a, b = load_model(out).state_dict(), load_model(tiny_checkpoint).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    printed = capsys.readouterr().out
    model = load_model(out)
    assert printed.startswith(f"{out}: ") and f"{model.num_parameters():,} parameters" in printed
    assert f"step {full['global_step']}, task mlm" in printed and '"val_ppl": 12.5' in printed


def test_slim_refuses_what_is_not_a_training_checkpoint(esm_file, tmp_path):
    for source in (tmp_path / "missing.ckpt", esm_file):
        with pytest.raises(SystemExit) as exit_info:
            convert.main(["--slim", str(source), str(tmp_path / "slim.ckpt")])
        message = str(exit_info.value.code)
        assert message.startswith(f"error: {source}: ") and "\n" not in message, message
    with pytest.raises(SystemExit, match="^error: --slim copies SOURCE to --out"):
        convert.main(["--slim", str(esm_file)])
    assert not (tmp_path / "slim.ckpt").exists()
