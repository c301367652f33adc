"""Packed proteins (issue 32): flat token streams with cu_seqlens, per-protein attention, the packed sampler."""

from __future__ import annotations

import pytest
import torch

from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet, BatchConverter

PROTEINS = [("a", "MKTAYIAKQR"), ("b", "GSHMLE"), ("c", "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQW"), ("d", "MW")]


def _model(attention: str, kernel: str, causal: bool, positions: str = "learned", **extra) -> PerformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, num_features=16, attention=attention, kernel=kernel,
                      causal=causal, positions=positions, max_positions=64, **extra)
    return PerformerLM(cfg).eval()


def _pack(proteins) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Each protein framed by BatchConverter, back to back: tokens (1, T), cu_seqlens (n+1,), the rows alone."""
    rows = [BatchConverter(Alphabet())([p])[2] for p in proteins]
    lengths = torch.tensor([r.shape[1] for r in rows])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return torch.cat(rows, dim=1), cu, rows


METHODS = [("favor", "relu"), ("favor", "softmax"), ("exact", "relu")]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("attention", "kernel"), METHODS)
def test_packed_batch_gives_each_protein_its_logits_alone(attention: str, kernel: str, causal: bool) -> None:
    model = _model(attention, kernel, causal)
    tokens, cu, rows = _pack(PROTEINS)
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)["logits"][0]
        for i, row in enumerate(rows):
            alone = model(row)["logits"][0]  # the same model: the same random features
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_positions_restart_in_every_protein(positions: str) -> None:
    model = _model("favor", "softmax", False, positions)
    tokens, cu, rows = _pack(PROTEINS)
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)["logits"][0]
        for i, row in enumerate(rows):
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], model(row)["logits"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("attention", "kernel"), METHODS)
def test_changing_one_protein_changes_no_other(attention: str, kernel: str, causal: bool) -> None:
    model = _model(attention, kernel, causal)
    tokens, cu, _ = _pack(PROTEINS)
    changed = tokens.clone()
    changed[0, cu[1] + 1: cu[2] - 1] = 12  # protein b's residues
    with torch.no_grad():
        a, b = model(tokens, cu_seqlens=cu)["logits"][0], model(changed, cu_seqlens=cu)["logits"][0]
    inside = torch.zeros(tokens.shape[1], dtype=torch.bool)
    inside[cu[1]: cu[2]] = True
    assert torch.equal(a[~inside], b[~inside])
    assert not torch.allclose(a[inside], b[inside])


@pytest.mark.parametrize("causal", [False, True])
def test_packed_gradients_and_bf16_autocast(causal: bool) -> None:
    """Backward runs through every packed path, and bf16 autocast agrees with each protein alone to bf16 precision."""
    model = _model("favor", "softmax", causal, token_dropout=True)
    tokens, cu, rows = _pack(PROTEINS)
    model.train()
    model(tokens, cu_seqlens=cu)["logits"].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(tokens, cu_seqlens=cu)["logits"][0].float()
        for i, row in enumerate(rows):
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], model(row)["logits"][0].float(), atol=2e-2, rtol=0)


def test_bad_cu_seqlens_are_refused() -> None:
    model = _model("favor", "relu", False)
    tokens, cu, _ = _pack(PROTEINS)
    with pytest.raises(ValueError, match="rise strictly from 0"):
        model(tokens, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="batch of 1"):
        model(tokens.repeat(2, 1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_positions"):
        long = torch.full((1, 70), 10)
        model(long, cu_seqlens=torch.tensor([0, 70], dtype=torch.int32))
