"""Vig et al.'s published attention-vs-BLOSUM statistic: binarised counts by hand, head dropping, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proteinperformer.analysis import (
    AMINO_ACIDS,
    aa_similarity,
    attention_counts,
    attention_maps,
    binarised_target_counts,
    offdiagonal_pearson,
    substitution_matrix,
    vig_compare,
    vig_fractions,
)
from tests.test_analysis import SEQ, tiny_model

A, C = AMINO_ACIDS.index("A"), AMINO_ACIDS.index("C")


def test_binarised_target_counts_toy_map_by_hand():
    seq = "ACAX"
    maps = torch.tensor([[0.5, 0.2, 0.2, 0.1],
                         [0.3, 0.3, 0.4, 0.0],
                         [0.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 0.6, 0.4]])[None, None]
    counts = binarised_target_counts(seq, maps, threshold=0.3)
    # weights >= 0.3: (0,0)->A (1,0)->A (1,1)->C (1,2)->A (2,1)->C (3,2)->A (3,3)->X; the source never matters
    assert counts.shape == (1, 1, 21)
    assert counts[0, 0, A] == 4 and counts[0, 0, C] == 2 and counts[0, 0, 20] == 1 and counts.sum() == 7
    frac, kept = vig_fractions(counts, min_edges=7)
    assert kept.tolist() == [[True]] and frac[0, A] == pytest.approx(4 / 7) and frac[0, C] == pytest.approx(2 / 7)
    assert vig_fractions(counts, min_edges=8)[1].tolist() == [[False]]  # 7 edges < 8: dropped


def test_vig_compare_drops_heads_below_min_edges():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(2, 3, 21)).astype(float)
    counts[0, 1] = 0
    counts[0, 1, :5] = 19  # 95 edges: below 100, dropped
    counts[1, 2] *= 0
    counts[1, 2, 0] = 100  # exactly 100: kept
    res = vig_compare(counts, ["BLOSUM62"], min_edges=100)
    kept_heads = [counts[0, 0], counts[0, 2], counts[1, 0], counts[1, 1], counts[1, 2]]
    assert all(h.sum() >= 100 for h in kept_heads)
    assert res["n_heads"] == 6 and res["n_heads_kept"] == 5 and res["kept_per_layer"] == [2, 3]
    frac = np.stack([h[:20] / h.sum() for h in kept_heads])
    assert res["overall"]["BLOSUM62"] == pytest.approx(offdiagonal_pearson(aa_similarity(frac),
                                                                           substitution_matrix("BLOSUM62")))
    changed = counts.copy()
    changed[0, 1, :5] = [1, 50, 3, 40, 0]  # still < 100 edges: r must not move
    assert vig_compare(changed, ["BLOSUM62"])["overall"]["BLOSUM62"] == pytest.approx(res["overall"]["BLOSUM62"])
    assert np.isnan(vig_compare(counts, ["BLOSUM62"], min_edges=10_000)["overall"]["BLOSUM62"])  # no head left
    assert res["edges_per_head"][0][1] == 95


def test_attention_counts_streaming_equals_maps():
    model = tiny_model()
    seqs = [SEQ, "ACDEFGHIKLMNPQRSTVWY" * 2]
    stats = attention_counts(model, seqs, block_size=9, threshold=0.05)
    by_maps = sum(binarised_target_counts(s, attention_maps(model, s), threshold=0.05) for s in seqs)
    assert by_maps.sum() > 0
    torch.testing.assert_close(stats["binarised"], by_maps)
    assert stats["max_weight"].max() == pytest.approx(max(float(attention_maps(model, s).max()) for s in seqs))
