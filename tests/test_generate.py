"""Sampling from CLM checkpoints: step-wise decoding equals the full forward pass; FASTA output; MLM refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from Bio import SeqIO

from proteinperformer.cli.generate import main
from proteinperformer.inference.generate import filter_logits, init_states, load_clm, sample, step_logits
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet
from proteinperformer.training.lm import ProteinLM

TINY = {"dim": 32, "depth": 2, "heads": 2, "ff_dim": 64, "num_features": 16, "max_positions": 64}
AMINO_ACIDS = set("ACDEFGHIKLMNPQRSTVWYXBZUO")


def _lm(task: str = "clm", **config) -> ProteinLM:
    torch.manual_seed(0)
    return ProteinLM({**TINY, "causal": task == "clm", **config}, task=task).eval()


def _save(lm: ProteinLM, path: Path) -> Path:
    """A checkpoint file as Lightning writes it (hyper-parameters + state dict)."""
    ckpt = {"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
            "pytorch-lightning_version": pl.__version__}
    lm.on_save_checkpoint(ckpt)  # adds the alphabet, as in every checkpoint training writes
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "config",
    [{"attention": "favor", "kernel": "relu"}, {"attention": "favor", "kernel": "softmax"},
     {"attention": "exact"}, {"attention": "favor", "kernel": "relu", "positions": "sinusoidal"}],
    ids=["favor-relu", "favor-softmax", "exact-kvcache", "favor-sinusoidal"],
)
def test_stepwise_logits_equal_full_forward(config: dict) -> None:
    model = _lm(**config).model
    tokens = torch.randint(5, 25, (3, 40))
    tokens[:, 0] = 1  # <cls>
    with torch.no_grad():
        full = model(tokens)["logits"]  # (B, T, V)
    states = init_states(model, tokens.shape[0])
    for t in range(tokens.shape[1]):
        logits, states = step_logits(model, tokens[:, t], t, states)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4, msg=f"position {t}")


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits)).all()


def test_generate_writes_parseable_fasta(tmp_path: Path) -> None:
    ckpt = _save(_lm(), tmp_path / "clm.ckpt")
    out = tmp_path / "samples" / "out.fasta"
    main([str(ckpt), str(out), "--num_samples", "4", "--max_length", "30", "--prompt", "MK", "--top_p", "0.9",
          "--temperature", "1.5", "--seed", "3"])
    records = list(SeqIO.parse(out, "fasta"))
    assert len(records) == 4 and not list(out.parent.glob("*.tmp"))
    for r in records:
        seq = str(r.seq)
        assert seq.startswith("MK") and 2 < len(seq) <= 30 and set(seq) <= AMINO_ACIDS, seq
    # same seed, same samples
    main([str(ckpt), str(tmp_path / "again.fasta"), "--num_samples", "4", "--max_length", "30", "--prompt", "MK",
          "--top_p", "0.9", "--temperature", "1.5", "--seed", "3"])
    assert [str(r.seq) for r in SeqIO.parse(tmp_path / "again.fasta", "fasta")] == [str(r.seq) for r in records]


def test_mlm_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = _save(_lm("mlm"), tmp_path / "mlm.ckpt")
    with pytest.raises(ValueError, match="masked-LM.*task=clm"):
        load_clm(ckpt)


@pytest.mark.parametrize("config", [{"attention": "favor", "kernel": "softmax"}, {"attention": "exact"}],
                         ids=["favor-softmax", "exact-kvcache"])
def test_stepwise_decoding_under_bf16_autocast_tracks_float32(config: dict) -> None:
    """pp-generate --precision bf16: each step under autocast stays close to the float32 full forward."""
    model = _lm(**config).model
    tokens = torch.randint(5, 25, (3, 30))
    tokens[:, 0] = 1
    with torch.no_grad():
        full = model(tokens)["logits"]
    states = init_states(model, tokens.shape[0])
    for t in range(tokens.shape[1]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, states = step_logits(model, tokens[:, t], t, states)
        err = ((logits.float() - full[:, t]).norm() / full[:, t].norm()).item()
        assert err < 0.02, f"position {t}: relative error {err:.4f}"


def test_generate_cli_precision(tmp_path: Path) -> None:
    ckpt = _save(_lm(), tmp_path / "clm.ckpt")
    out = tmp_path / "bf16.fasta"
    main([str(ckpt), str(out), "--num_samples", "3", "--max_length", "20", "--precision", "bf16", "--device", "cpu"])
    assert len(list(SeqIO.parse(out, "fasta"))) == 3
    with pytest.raises(SystemExit, match="error: a GPU was requested"):
        main([str(ckpt), str(out), "--precision", "bf16", "--device", "cuda"])


def _train_clm_on_crops(fake_ends: bool, steps: int = 60) -> tuple[PerformerLM, Alphabet]:
    """A tiny CLM trained on 24-token crops of 150–250-residue proteins. fake_ends=True frames every crop as
    ``<cls> … <eos>`` as the datasets did before (the old behaviour, for contrast)."""
    import numpy as np

    from proteinperformer.data import CLMCollator, SingleSequenceDataset, TokenizedSequences
    from proteinperformer.data.fasta import FastaRecord

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    alphabet = Alphabet()
    records = [FastaRecord(f"P{i}", f"P{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(150, 250))))
               for i in range(64)]
    ds = SingleSequenceDataset(TokenizedSequences.from_records(records, alphabet), alphabet, max_len=24)
    collate = CLMCollator(alphabet)
    model = PerformerLM(ModelConfig(dim=32, depth=1, heads=2, ff_dim=64, attention="exact", causal=True,
                                    positions="sinusoidal"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        items = [ds[(step, int(i))] for i in rng.integers(0, len(ds), 32)]
        if fake_ends:
            for item in items:
                item["tokens"][0], item["tokens"][-1] = alphabet.cls_idx, alphabet.eos_idx
        batch = collate(items)
        logits = model(batch["input_ids"], batch["padding_mask"])["logits"]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), alphabet


def test_clm_trained_on_crops_does_not_stop_at_the_crop_length() -> None:
    """Crops of long proteins carry no fake <eos>, so sampled lengths do not pile up at the crop length (22
    residues for 24-token crops); with the old framing they do (the contrast shows the test can fail)."""
    crop_residues = 22
    fractions = {}
    for fake_ends in (True, False):
        model, alphabet = _train_clm_on_crops(fake_ends)
        lengths = [len(s) for s in sample(model, alphabet, num_samples=64, max_length=60, seed=1)]
        fractions[fake_ends] = sum(n == crop_residues for n in lengths) / len(lengths)
    assert fractions[True] > 0.5, fractions  # the old crops teach the model to stop at the crop length
    assert fractions[False] < 0.1, fractions


@pytest.mark.parametrize("source", [{"kernel": "relu", "use_projection": False}, {"attention": "exact"}])
def test_load_model_draws_a_projection_for_softmax_favor(tmp_path: Path, source: dict) -> None:
    """load_model(..., attention="favor", kernel="softmax") on a model trained without a projection draws one
    (reproducibly) instead of failing with "needs a projection"; every trained weight is kept."""
    from proteinperformer.checkpoints import load_model

    lm = _lm(**source)
    path = _save(lm, tmp_path / "src.ckpt")
    models = [load_model(path, attention="favor", kernel="softmax") for _ in range(2)]
    for model in models:
        assert model.config.kernel == "softmax" and model.config.use_projection
        assert all(block.attn.projection.shape == (16, 16) for block in model.layers)
        assert torch.equal(model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(models[0].layers[0].attn.projection, models[1].layers[0].attn.projection)
    tokens = torch.randint(5, 25, (2, 20))
    with torch.no_grad():
        assert torch.isfinite(models[0](tokens)["logits"]).all()
