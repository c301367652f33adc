"""Attention analysis: recovered maps, amino-acid aggregation, APC and contact precision (no checkpoint needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from proteinperformer.analysis import (
    AMINO_ACIDS,
    aa_similarity,
    apc,
    attention_fractions,
    attention_inputs,
    attention_maps,
    background_rate,
    contact_map,
    iter_attention_blocks,
    load_structures,
    offdiagonal_pearson,
    pair_counts,
    pair_counts_from_maps,
    precision_at,
    random_init_like,
    substitution_matrix,
    symmetrize,
)
from proteinperformer.attention.reference import favor_weights
from proteinperformer.model import ModelConfig, PerformerLM

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ROOT / "data" / "structures" / "pdb_chains_subset60.npz"
SEQ = "MVHLTPEEKSAVTALWGKVNVDEVGGEALGRLLVVYPWTQRFFESFGDLSTPDAVMGNPKV"  # start of human haemoglobin β


def tiny_model(**kw) -> PerformerLM:
    torch.manual_seed(0)
    cfg = dict(dim=32, depth=2, heads=2, ff_dim=64, num_features=16, positions="sinusoidal")
    model = PerformerLM(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # larger q/k weights than the 0.02 init, so attention is far from uniform
        for block in model.layers:
            block.attn.qkv.weight.mul_(20)
    return model


def explicit_maps(model: PerformerLM, seq: str) -> torch.Tensor:
    """Attention of every layer/head by definition: the quadratic FAVOR+ reference (attention/reference.py) built
    from the feature maps, or softmax for exact layers.

    Token-level rows are normalised over all tokens, then cls/eos rows and columns are dropped: [layers, H, L, L].
    """
    out = []
    for layer, x in enumerate(attention_inputs(model, seq)):
        attn = model.layers[layer].attn
        q, k, _ = (t[0].double() for t in attn.split_heads(x))  # [H, T, d]
        T = q.shape[1]
        if attn.attention == "exact":
            w = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
            if attn.causal:
                w = w * torch.ones(T, T, dtype=torch.bool).tril()
            w = w / w.sum(-1, keepdim=True)
        else:
            P = None if attn.projection is None else attn.projection.double()
            w = favor_weights(q[None], k[None], P, attn.kernel, attn.causal)[0]
        out.append(w[:, 1:-1, 1:-1])
    return torch.stack(out).float()


KINDS = [
    dict(attention="favor", kernel="relu"),
    dict(attention="favor", kernel="relu", use_projection=False),
    dict(attention="favor", kernel="softmax"),
    dict(attention="favor", kernel="relu", causal=True),
    dict(attention="favor", kernel="softmax", causal=True),
    dict(attention="exact"),
    dict(attention="exact", causal=True),
]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_maps_equal_explicit_attention(kind):
    model = tiny_model(**kind)
    maps = attention_maps(model, SEQ)
    L = len(SEQ)
    assert maps.shape == (2, 2, L, L)
    torch.testing.assert_close(maps, explicit_maps(model, SEQ), atol=2e-5, rtol=1e-3)
    # token rows sum to 1, so residue rows sum to at most 1 and, renormalised, exactly 1
    assert maps.sum(-1).max() <= 1 + 1e-5
    torch.testing.assert_close(attention_maps(model, SEQ, renormalise=True).sum(-1), torch.ones(2, 2, L))
    if kind.get("causal"):
        assert maps.triu(1).abs().max() == 0


def test_attention_is_not_uniform():
    """Guard for the tests above: a map equal to the uniform average would make them trivial."""
    maps = attention_maps(tiny_model(attention="favor", kernel="softmax"), SEQ, renormalise=True)
    assert (maps.amax(-1) > 3.0 / len(SEQ)).float().mean() > 0.5


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[2], KINDS[4], KINDS[6]], ids=["relu", "softmax", "causal", "exact"])
def test_blocked_equals_full(kind):
    model = tiny_model(**kind)
    full = attention_maps(model, SEQ, block_size=4096)
    torch.testing.assert_close(attention_maps(model, SEQ, block_size=13), full, atol=1e-6, rtol=1e-5)
    blocks = list(iter_attention_blocks(model, SEQ, layers=[1], heads=[1, 0], block_size=16, head_block=1))
    assert len(blocks) == 2 * math.ceil(len(SEQ) / 16)
    for blk in blocks:
        assert blk.layer == 1 and len(blk.heads) == 1
        assert blk.values.shape == (1, blk.rows.stop - blk.rows.start, len(SEQ))
        torch.testing.assert_close(blk.values[0], full[1, blk.heads[0], blk.rows], atol=1e-6, rtol=1e-5)


def test_maps_select_layers_heads_and_accept_lightning_module():
    from proteinperformer.training.lm import ProteinLM

    lm = ProteinLM(dict(dim=32, depth=2, heads=2, ff_dim=64, num_features=16, positions="sinusoidal"))
    full = attention_maps(lm, SEQ)
    part = attention_maps(lm, SEQ, layers=[1], heads=[1])
    torch.testing.assert_close(part[0, 0], full[1, 1])
    with pytest.raises(TypeError):
        attention_maps(torch.nn.Linear(2, 2), SEQ)


def test_pair_counts_toy_case_by_hand():
    seq = "ACAX"  # X is not a standard residue: it counts nowhere
    maps = torch.tensor([[0.5, 0.2, 0.2, 0.1],
                         [0.3, 0.3, 0.4, 0.0],
                         [0.0, 1.0, 0.0, 0.0],
                         [0.25, 0.25, 0.25, 0.25]])[None, None]
    counts = pair_counts_from_maps(seq, maps)
    a, c = AMINO_ACIDS.index("A"), AMINO_ACIDS.index("C")
    assert counts.shape == (1, 1, 20, 20)
    # A->A: rows 0,2 cols 0,2 = 0.5+0.2+0+0; A->C: rows 0,2 col 1 = 0.2+1.0; C->A: row 1 cols 0,2 = 0.7; C->C: 0.3
    expected = {(a, a): 0.7, (a, c): 1.2, (c, a): 0.7, (c, c): 0.3}
    for (i, j), v in expected.items():
        assert counts[0, 0, i, j].item() == pytest.approx(v)
    assert counts.sum().item() == pytest.approx(2.9)
    frac = attention_fractions(counts)[0, 0]  # to A: 1.4 / 2.9, to C: 1.5 / 2.9
    assert frac[a] == pytest.approx(1.4 / 2.9) and frac[c] == pytest.approx(1.5 / 2.9)
    assert frac.sum() == pytest.approx(1.0)


def test_pair_counts_streaming_equals_maps():
    model = tiny_model()
    seqs = [SEQ, "ACDEFGHIKLMNPQRSTVWY" * 2]
    by_maps = sum(pair_counts_from_maps(s, attention_maps(model, s)) for s in seqs)
    torch.testing.assert_close(pair_counts(model, seqs, block_size=9), by_maps, atol=1e-5, rtol=1e-5)


def test_similarity_and_matrix_correlation():
    rng = np.random.default_rng(0)
    frac = rng.random((12, 20))
    frac[:, 1] = 2 * frac[:, 0] + 1  # C follows A exactly across heads
    sim = aa_similarity(frac)
    assert sim.shape == (20, 20) and sim[0, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    b62 = substitution_matrix("BLOSUM62")
    assert b62[AMINO_ACIDS.index("W"), AMINO_ACIDS.index("W")] == 11 and (b62 == b62.T).all()
    assert offdiagonal_pearson(b62, 2 * b62 + 1) == pytest.approx(1.0)
    assert offdiagonal_pearson(b62, -b62) == pytest.approx(-1.0)
    # only off-diagonal entries count: changing the diagonal does not change r
    assert offdiagonal_pearson(b62 + np.diag(rng.random(20) * 50), b62) == pytest.approx(1.0)
    assert -1 < offdiagonal_pearson(b62, substitution_matrix("PAM250")) < 1


def test_random_init_like_is_fresh_and_keeps_rng():
    model = tiny_model()
    state = torch.random.get_rng_state()
    null = random_init_like(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert null.config == model.config
    assert not torch.equal(null.layers[0].attn.qkv.weight, model.layers[0].attn.qkv.weight)


def test_apc_and_symmetrize_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # row sums 3, 7; column sums 4, 6; total 10
    torch.testing.assert_close(apc(x), torch.tensor([[1 - 1.2, 2 - 1.8], [3 - 2.8, 4 - 4.2]]))
    torch.testing.assert_close(symmetrize(x), torch.tensor([[2.0, 5.0], [5.0, 8.0]]))


def test_precision_at_by_hand():
    L = 30
    scores, contacts = np.zeros((L, L)), np.zeros((L, L), bool)
    contacts[0, 29] = contacts[0, 28] = contacts[1, 29] = True
    scores[0, 29], scores[2, 28], scores[0, 28] = 0.9, 0.8, 0.7
    scores[5, 10] = 5.0  # separation 5: outside the long range, must be ignored
    # long range (j - i >= 24): 6 + 5 + 4 + 3 + 2 + 1 = 21 pairs; top-3 (L/10) = (0,29) yes, (2,28) no, (0,28) yes
    assert precision_at(scores, contacts, 24, None, fraction=10) == pytest.approx(2 / 3)
    assert precision_at(scores, contacts, 24, None, fraction=30) == pytest.approx(1.0)  # top-1
    assert background_rate(contacts, 24) == pytest.approx(3 / 21)
    assert math.isnan(precision_at(scores, contacts, 40))


def test_bundled_structures():
    chains = load_structures(STRUCTURES)
    assert len(chains) == 60
    for ch in chains[:5]:
        assert len(ch.sequence) == len(ch.ca) == len(ch.cb)
        step = np.linalg.norm(np.diff(ch.ca, axis=0), axis=1)
        assert np.median(step) == pytest.approx(3.8, abs=0.05)
        cm = contact_map(ch.cb)
        assert cm.diagonal().all() and (cm == cm.T).all()
        assert 0 < background_rate(cm, 24) < 0.2
    # Each chain owns its coordinates: views into the file's arrays would keep one decompressed copy of the
    # whole file alive per chain (that exhausted 24 GiB on the 3,421-chain pdb_chains.npz).
    assert all(ch.ca.base is None and ch.cb.base is None for ch in chains)
