"""End-to-end: the real Hydra config, shrunk, trains MLM and CLM models that learn."""

import json
import math

import pandas as pd
import pytest
import torch

from proteinperformer.training.lm import ProteinLM
from proteinperformer.training.train import train

from .conftest import tiny_config


@pytest.mark.parametrize("overrides", [["task=mlm"], ["task=clm", "model=performer_softmax"]])
def test_tiny_training_lowers_loss(tmp_path, overrides):
    # all 8 validation batches (~1,000 masked residues): with 4 the score moved by ±1 ppl with the masks
    cfg = tiny_config(tmp_path, [*overrides, "trainer.max_steps=120", "trainer.val_check_interval=60",
                                  "trainer.limit_val_batches=8", "trainer.log_every_n_steps=1"])
    metrics = train(cfg)
    # An untrained model is near-uniform over the 32 tokens (ppl ~32, accuracy ~3%); 120 steps must get
    # well below that, towards the amino-acid frequency baseline (~18).
    assert metrics["val_ppl"] < 21.0, metrics
    assert metrics["val_acc"] > 0.06, metrics
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["val_ppl"] == pytest.approx(metrics["val_ppl"]) and saved["global_step"] == 120
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    train_loss = log["train/loss"].dropna().to_numpy()
    assert len(train_loss) == 120 and train_loss[-5:].mean() < train_loss[:5].mean() - 0.25, train_loss
    ckpt = torch.load(metrics["last_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["task"] == cfg.task_name and ckpt["alphabet"][:2] == ["<pad>", "<cls>"]


def test_task_and_causality_must_agree():
    with pytest.raises(ValueError, match="task='clm' needs model causal=True"):
        ProteinLM({"dim": 16, "depth": 1, "heads": 2, "ff_dim": 32, "causal": False}, task="clm")
    with pytest.raises(ValueError, match="task must be one of"):
        ProteinLM({"dim": 16, "depth": 1, "heads": 2, "ff_dim": 32}, task="mlmx")


def test_clm_model_is_causal():
    lm = ProteinLM({"dim": 32, "depth": 2, "heads": 2, "ff_dim": 64, "causal": True, "num_features": 16}, task="clm")
    tokens = torch.randint(5, 25, (1, 40))
    a = lm.model(tokens)["logits"]
    tokens2 = tokens.clone()
    tokens2[0, 30:] = 7
    b = lm.model(tokens2)["logits"]
    torch.testing.assert_close(a[:, :30], b[:, :30])
    assert not math.isclose(float((a[:, 31:] - b[:, 31:]).abs().max()), 0.0)


def test_padding_idx_follows_the_alphabet_and_a_disagreeing_config_is_refused(tmp_path):
    from proteinperformer.checkpoints import CheckpointError, load_model, save_checkpoint
    from proteinperformer.model import ModelConfig, PerformerLM
    from proteinperformer.tokenizer import Alphabet

    tiny = {"dim": 16, "depth": 1, "heads": 2, "ff_dim": 32, "num_features": 8}
    for name in ("proteinperformer", "esm"):
        alphabet = Alphabet(name)
        model = PerformerLM(ModelConfig(**tiny, alphabet=name, vocab_size=len(alphabet) + (-len(alphabet)) % 8))
        assert model.config.padding_idx == model.embed_tokens.padding_idx == alphabet.padding_idx
        tokens = torch.tensor([[alphabet.cls_idx, 10, 11, alphabet.eos_idx, alphabet.padding_idx]])
        torch.testing.assert_close(model(tokens)["logits"][:, :4], model(tokens[:, :4])["logits"])  # pad inferred
        model.embed(tokens).square().sum().backward()  # <cls> is a token: its embedding trains; <pad>'s does not
        assert model.embed_tokens.weight.grad[alphabet.cls_idx].abs().sum() > 0
        assert model.embed_tokens.weight.grad[alphabet.padding_idx].abs().sum() == 0
    with pytest.raises(ValueError, match="padding_idx=0 disagrees with the 'esm' alphabet, whose <pad> id is 1"):
        ModelConfig(alphabet="esm", vocab_size=40, padding_idx=0)
    assert ModelConfig(alphabet="esm", vocab_size=40, padding_idx=1).padding_idx == 1
    path = save_checkpoint(PerformerLM(ModelConfig(**tiny)), tmp_path / "m.ckpt", "test")
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["config"]["padding_idx"] = 3
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="disagrees with the 'proteinperformer' alphabet"):
        load_model(path)
