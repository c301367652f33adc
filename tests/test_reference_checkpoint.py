"""The shipped reference checkpoint (weights/pp_mlm_relu_2.7M.ckpt) is what its model card says it is."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from proteinperformer.checkpoints import load_model
from proteinperformer.data import load_fasta
from proteinperformer.inference.embed import embed
from proteinperformer.tokenizer import Alphabet

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "weights" / "pp_mlm_relu_2.7M.ckpt"
SAMPLE_FASTA = ROOT / "data" / "uniprot_sample20k.fasta.gz"


def test_reference_checkpoint_matches_its_model_card():
    assert REFERENCE.stat().st_size <= 25e6
    model = load_model(REFERENCE)
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.ff_dim) == (192, 6, 6, 768)
    assert (cfg.attention, cfg.kernel, cfg.positions, cfg.causal) == ("favor", "relu", "sinusoidal", False)
    assert 2.5e6 < model.num_parameters() < 2.8e6
    reps = embed(model, {"P69905": "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF"}, include=("mean", "per_tok"))
    assert reps["P69905"]["per_tok"][-1].shape == (47, 192) and torch.isfinite(reps["P69905"]["mean"][-1]).all()


@torch.no_grad()
def test_reference_checkpoint_predicts_masked_residues_better_than_the_unigram_baseline():
    """On proteins of the bundled sample (not the training corpus), with 15% of residues replaced by <mask>,
    the model beats predicting every residue from amino-acid frequencies, in accuracy and perplexity."""
    alphabet = Alphabet()
    model = load_model(REFERENCE)
    records = load_fasta(SAMPLE_FASTA, alphabet)[:500]
    _, _, tokens = alphabet.get_batch_converter(max_len=256)([(r.id, r.sequence) for r in records])
    residues = alphabet.is_residue(tokens)
    g = torch.Generator().manual_seed(0)
    masked = residues & (torch.rand(tokens.shape, generator=g) < 0.15)
    inputs = tokens.masked_fill(masked, alphabet.mask_idx)
    logits = torch.cat([model(inputs[i : i + 32])["logits"] for i in range(0, len(inputs), 32)])
    targets = tokens[masked]
    model_acc = (logits[masked].argmax(-1) == targets).float().mean().item()
    model_ppl = math.exp(F.cross_entropy(logits[masked], targets).item())

    # The baseline knows the amino-acid frequencies of these very proteins (a slightly unfair advantage).
    freqs = torch.bincount(tokens[residues], minlength=len(alphabet)).float()
    freqs /= freqs.sum()
    base_acc = (targets == freqs.argmax()).float().mean().item()
    base_ppl = math.exp(-freqs[targets].log().mean().item())
    n = len(targets)
    assert n > 10000
    # Accuracy: at least 3 standard errors above the baseline; perplexity: clearly lower.
    assert model_acc > base_acc + 3 * math.sqrt(base_acc * (1 - base_acc) / n), (model_acc, base_acc)
    assert model_ppl < base_ppl - 0.2, (model_ppl, base_ppl)
