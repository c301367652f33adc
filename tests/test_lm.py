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


def test_unigram_baseline_on_a_hand_counted_split():
    from proteinperformer.data import FastaRecord, TokenizedSequences
    from proteinperformer.data.unigram import unigram_baseline, unigram_description, unigram_frequencies
    from proteinperformer.tokenizer import Alphabet

    alphabet = Alphabet()

    def split(*seqs: str) -> TokenizedSequences:
        return TokenizedSequences.from_records([FastaRecord(f"s{i}", "", s, "", 0, {}) for i, s in enumerate(seqs)],
                                               alphabet)

    # train: A 3, C 1, G 1; add-one over the 25 residue letters -> 30: f(A) = 4/30, f(C) = f(G) = 2/30, W 1/30
    freqs = unigram_frequencies(split("AAC", "AG").residue_counts(len(alphabet)), alphabet)
    tok = alphabet.tok_to_idx
    assert freqs[tok["A"]] == pytest.approx(4 / 30) and freqs[tok["X"]] == pytest.approx(1 / 30)
    assert freqs.sum() == pytest.approx(1) and freqs[alphabet.mask_idx] == 0
    base = unigram_baseline(split("AAC", "AG"), split("ACW"), alphabet)
    # valid A C W: one of three is the most frequent letter A; ppl = (30/4 * 30/2 * 30/1) ** (1/3) = 15
    assert base["accuracy"] == pytest.approx(1 / 3) and base["perplexity"] == pytest.approx(15.0)
    assert base["residues"] == 3 and base["most_frequent"] == "A"
    assert unigram_description(alphabet, "train-split", "valid") == (
        "train-split frequencies of 25 residue letters, on valid")
    with pytest.raises(ValueError, match="no residue to score"):
        unigram_baseline(split("AAC"), split(), alphabet)


def test_one_scorer_gives_training_validations_numbers(tmp_path):
    """score_batches over the data module's validation batches = what trainer.validate logs, and the logged
    baseline is unigram_baseline of the train and valid splits."""
    import pytorch_lightning as pl

    from proteinperformer.data.datamodule import ProteinDataModule
    from proteinperformer.data.unigram import unigram_baseline
    from proteinperformer.training.scoring import score_batches

    from .conftest import SAMPLE_FASTA

    for task, causal in (("mlm", False), ("clm", True)):
        dm = ProteinDataModule.from_hparams(fasta_path=str(SAMPLE_FASTA), task=task, max_len=64, batch_size=8,
                                            max_sequences=200, valid_frac=0.2)
        torch.manual_seed(0)
        lm = ProteinLM({"dim": 32, "depth": 1, "heads": 2, "ff_dim": 64, "num_features": 16, "causal": causal},
                       task=task)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        logged = trainer.validate(lm, datamodule=dm, verbose=False)[0]
        scores = score_batches(lm.model, dm.val_dataloader(), dm.alphabet)
        assert scores["residues"] > 200
        assert scores["accuracy"] == pytest.approx(logged["val/acc"], rel=1e-6)
        assert scores["perplexity"] == pytest.approx(logged["val/ppl"], rel=1e-6)
        assert scores["loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
        base = unigram_baseline(dm.splits["train"], dm.splits["valid"], dm.alphabet)
        assert base["accuracy"] == pytest.approx(logged["val/baseline_acc"], rel=1e-6)
        assert base["perplexity"] == pytest.approx(logged["val/baseline_ppl"], rel=1e-6)


def test_library_imports_leave_the_warning_filters_alone():
    import subprocess
    import sys

    from .conftest import ROOT

    code = ("import warnings, pytorch_lightning, torchmetrics, transformers, hydra; before = list(warnings.filters); "
            "import proteinperformer.training.train, proteinperformer.inference.embed_files, proteinperformer.cli; "
            "assert warnings.filters == before, [f for f in warnings.filters if f not in before]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
