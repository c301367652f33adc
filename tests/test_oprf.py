"""FAVOR++ (optimal positive random features, OPRF) and per-dimension rescaling: statistics in float64 against the
plain definition, the rewrite of q, k, P that feeds the FAVOR+ kernel in every path, calibration, checkpoints and
the one-line errors of pp-convert --features / --calibrate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from proteinperformer.attention import exact_attention, favor_attention, redraw_projections
from proteinperformer.attention.oprf import (
    convert_moments,
    dense_inputs,
    dense_parameters,
    feature_parameters,
    oprf_features,
    oprf_inputs,
    optimal_a,
    pair_moment_sums,
    rescaling,
)
from proteinperformer.attention.projection import gaussian_projection
from proteinperformer.attention.reference import favor_weights
from proteinperformer.checkpoints import load_model, read_torch, save_checkpoint
from proteinperformer.cli import convert
from proteinperformer.model import ModelConfig, PerformerLM, calibrate_features, convert_attention

D64 = torch.float64


def definition(x: torch.Tensor, P: torch.Tensor, a: float) -> torch.Tensor:
    """f(ω, x) = (1 − 4A)^(d/4) exp(A‖ω‖² + √(1 − 4A) ωᵀx − ‖x‖²/2), written out: (d,), (m, d) -> (m,)."""
    d = x.shape[0]
    out = torch.empty(P.shape[0], dtype=D64)
    for j, w in enumerate(P):
        out[j] = (1 - 4 * a) ** (d / 4) * math.exp(a * float(w @ w) + math.sqrt(1 - 4 * a) * float(w @ x)
                                                   - float(x @ x) / 2)
    return out


def test_oprf_features_are_the_definition_and_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    d, m = 6, 200_000
    x, y = torch.randn(2, d, generator=g, dtype=D64) * 0.6
    P = torch.randn(m, d, generator=g, dtype=D64)
    a = -0.2
    fx, fy = oprf_features(x, P, a), oprf_features(y, P, a)
    assert torch.allclose(fx[:50] * m**0.5, definition(x, P[:50], a), rtol=1e-12)
    prod = fx * fy * m  # one unbiased sample of exp(xᵀy) per feature
    mean, se = prod.mean(), prod.std() / m**0.5
    assert abs(mean - math.exp(float(x @ y))) < 4 * se
    assert se < 0.02 * mean  # the test can tell a biased map apart


def test_optimal_a_lowers_the_variance_for_large_norms() -> None:
    g = torch.Generator().manual_seed(1)
    d, m = 8, 100_000
    x = torch.randn(d, generator=g, dtype=D64)
    x = x / x.norm() * 1.6
    y = 0.8 * x + 0.3 * torch.randn(d, generator=g, dtype=D64)  # large norms, aligned: sharp attention
    P = torch.randn(m, d, generator=g, dtype=D64)
    a = float(optimal_a(torch.tensor(float((x + y) @ (x + y))), d))
    assert a < -0.05
    var = {A: (oprf_features(x, P, A) * oprf_features(y, P, A) * m).var() for A in (0.0, a)}
    assert var[a] < 0.5 * var[0.0]


def test_a_zero_is_favor_plus_and_psi_one_changes_nothing() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=D64) for _ in range(3))
    P = gaussian_projection(16, 8, generator=g).double()
    qt, kt, Pt = oprf_inputs(q, k, P, torch.zeros(3, dtype=D64), torch.ones(3, 8, dtype=D64))
    for causal in (False, True):
        want = favor_attention(q, k, v, P, causal=causal)
        assert torch.allclose(favor_attention(qt, kt, v, Pt, causal=causal), want, rtol=1e-10, atol=1e-12)


def test_the_rewritten_inputs_give_the_oprf_definition() -> None:
    """favor_weights on (q̃, k̃, P̃) equals attention weights built from f(ω, Ψx) f(ω, Ψ⁻¹y) of the definition."""
    g = torch.Generator().manual_seed(3)
    H, L, d, m = 2, 5, 4, 12
    q, k = (torch.randn(1, H, L, d, generator=g, dtype=D64) * 1.5 for _ in range(2))
    P = torch.randn(m, d, generator=g, dtype=D64)
    a = torch.tensor([-0.3, -0.05], dtype=D64)
    psi = torch.rand(H, d, generator=g, dtype=D64) + 0.5
    w = favor_weights(*oprf_inputs(q, k, P, a, psi), causal=True)
    for h in range(H):
        x, y = q[0, h] * psi[h] * d**-0.25, k[0, h] / psi[h] * d**-0.25
        fx = torch.stack([definition(xi, P, float(a[h])) for xi in x])
        fy = torch.stack([definition(yi, P, float(a[h])) for yi in y])
        want = (fx @ fy.T).tril()
        want = want / want.sum(-1, keepdim=True)
        assert (w[0, h] - want).abs().max() < 1e-4  # the kernel adds an ε = 1e-6 floor to every feature


def test_rescaling_keeps_the_exact_attention_and_large_m_approaches_it() -> None:
    """Ψ leaves qᵀk unchanged: with many features the rescaled FAVOR++ output approaches exact attention even for a
    far-from-one Ψ (applying Ψ to both q and k, or not at all to k, would change the attention)."""
    g = torch.Generator().manual_seed(4)
    H, L, d = 2, 9, 4
    q, k = (torch.randn(1, H, L, d, generator=g, dtype=D64) * 0.7 for _ in range(2))
    v = torch.randn(1, H, L, 3, generator=g, dtype=D64)
    psi = torch.tensor([[1.6, 0.6, 1.0, 1.3], [0.7, 0.8, 1.4, 1.0]], dtype=D64)
    exact = exact_attention(q, k, v)
    assert torch.allclose(exact_attention(q * psi[:, None], k / psi[:, None], v), exact)
    P = gaussian_projection(8192, d, generator=g).double()
    a = torch.full((H,), -0.1, dtype=D64)
    qt, kt, Pt = oprf_inputs(q, k, P, a, psi)
    assert (favor_attention(qt, kt, v, Pt) - exact).norm() / exact.norm() < 0.1  # measured 0.063 (A = 0: 0.18)
    qt, kt, Pt = oprf_inputs(q, k * psi[:, None] ** 2, P, a, psi)  # Ψ on both q and k: another attention
    assert (favor_attention(qt, kt, v, Pt) - exact).norm() / exact.norm() > 0.3  # measured 0.59


def attended_pairs(mask: torch.Tensor, causal: bool):
    """(b, i, j) of every query–key pair attention sees, by brute force: both real tokens, j ≤ i if causal."""
    B, L = mask.shape
    for b in range(B):
        for i in range(L):
            for j in range(L):
                if not (mask[b, i] or mask[b, j] or (causal and j > i)):
                    yield b, i, j


def test_pair_moments_count_the_pairs_attention_sees() -> None:
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 3, 6, 4, generator=g, dtype=D64) for _ in range(2))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    for causal in (False, True):
        sums, pairs = pair_moment_sums(q, k, causal, mask)
        want, n = torch.zeros(3, 3, 4, dtype=D64), 0
        for b, i, j in attended_pairs(mask, causal):
            x, y = q[b, :, i] * 4**-0.25, k[b, :, j] * 4**-0.25
            want += torch.stack([x * x, y * y, x * y], 1)
            n += 1
        assert float(pairs) == n and torch.allclose(sums, want)


# ----------------------------------------------------------------------------- oprf-dense: matrix and key shift


def correlated_pairs(n: int = 4000, d: int = 6, seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (n, d) like trained queries and keys: anisotropic, correlated coordinates and large common means."""
    g = torch.Generator().manual_seed(seed)
    mix_x, mix_y = (torch.randn(d, d, generator=g, dtype=D64) * 0.4 for _ in range(2))
    x = torch.randn(n, d, generator=g, dtype=D64) @ mix_x + 0.8
    y = torch.randn(n, d, generator=g, dtype=D64) @ mix_y - 0.5 * torch.arange(d, dtype=D64) / d
    return x, y


def dense_moments(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """oprf-dense's moments (1, 2d + 3, d) of the pairs (x_i, y_i), written out."""
    n = len(x)
    rows = [x.T @ x / n, y.T @ y / n, x.mean(0)[None], y.mean(0)[None], (x * y).mean(0)[None]]
    return torch.cat(rows)[None]


def test_dense_map_keeps_the_attention_and_lowers_phi_below_the_diagonal_rescaling() -> None:
    x, y = correlated_pairs()
    d = x.shape[1]
    a, maps = dense_parameters(dense_moments(x, y))
    M, Mt, c = maps[0, 0, :d], maps[0, 1, :d], maps[0, 1, d]
    assert torch.allclose(M @ Mt.T, torch.eye(d, dtype=D64), atol=1e-10)  # M⁻ᵀ: xᵀy unchanged
    cx, cy = torch.cov(x.T, correction=0), torch.cov(y.T, correction=0)
    S = M @ M
    assert torch.allclose(S @ cx @ S, cy, atol=1e-5)  # the geometric mean: S C_x S = C_y (up to the 1e-6 ridge)
    xs, ys = x @ M.T, y @ Mt.T - c
    assert torch.allclose(c, (xs + y @ Mt.T).mean(0), atol=1e-12)
    phi = {"favor+": ((x + y) ** 2).sum(-1).mean(), "dense": ((xs + ys) ** 2).sum(-1).mean()}
    psi = rescaling(torch.stack([(x * x).mean(0), (y * y).mean(0), (x * y).mean(0)])[None])[0]
    phi["rescaled"] = ((x * psi + y / psi) ** 2).sum(-1).mean()
    assert phi["dense"] < 0.8 * phi["rescaled"] and phi["rescaled"] < phi["favor+"]
    assert torch.allclose(a, optimal_a(phi["dense"], d))  # A* from Φ(M, c)
    # the attention of any query over any keys is unchanged: the shift moves all its logits alike
    q, k = (t[None, None, :9] * d**0.25 for t in (x, y))  # x = d^(-1/4) q
    v = torch.randn(1, 1, 9, 3, generator=torch.Generator().manual_seed(0), dtype=D64)
    qd, kd = dense_inputs(q, k, maps)
    for causal in (False, True):
        assert torch.allclose(exact_attention(qd, kd, v, causal=causal), exact_attention(q, k, v, causal=causal),
                              atol=1e-12)


def test_a_dead_coordinate_keeps_the_dense_map_usable_in_float32() -> None:
    """A query coordinate that is always 0 (no variance to calibrate on): M stays finite and float32 q, k carry
    the exact attention through M and M⁻ᵀ."""
    x, y = correlated_pairs(n=500)
    x[:, 0] = 0.0
    d = x.shape[1]
    a, maps = dense_parameters(dense_moments(x, y))
    assert torch.isfinite(maps).all() and torch.isfinite(a).all()
    q, k = (t[None, None, :12].float() * d**0.25 for t in (x, y))
    v = torch.randn(1, 1, 12, 3)
    qd, kd = dense_inputs(q, k, maps.float())
    assert qd.dtype == torch.float32
    assert torch.allclose(exact_attention(qd, kd, v, causal=True), exact_attention(q, k, v, causal=True), atol=1e-4)


def test_dense_features_are_unbiased_for_the_shifted_kernel() -> None:
    """E[f(ω, Mx) f(ω, M⁻ᵀy − c)] = exp(xᵀy − (Mx)ᵀc): the OPRF estimator of the rewritten pair, whose query
    factor exp(−(Mx)ᵀc) the attention's normaliser cancels."""
    x, y = correlated_pairs(n=500)
    d = x.shape[1]
    a, maps = dense_parameters(dense_moments(x, y))
    M, Mt, c = maps[0, 0, :d], maps[0, 1, :d], maps[0, 1, d]
    xi, yj = x[0] * 0.5, y[1] * 0.5
    m = 200_000
    P = torch.randn(m, d, generator=torch.Generator().manual_seed(10), dtype=D64)
    prod = oprf_features(M @ xi, P, float(a)) * oprf_features(Mt @ yj - c, P, float(a)) * m
    mean, se = prod.mean(), prod.std() / m**0.5
    assert abs(mean - math.exp(float(xi @ yj - (M @ xi) @ c))) < 4 * se and se < 0.03 * mean


def test_dense_attention_is_closer_to_exact_than_favor_plus_and_rescaled_and_needs_no_floor() -> None:
    """Sharp attention of large, shifted q and k (float64, 8 draws): the calibrated dense map's output error is a
    fraction of FAVOR+'s and of the diagonal rescaling's; the ε = 1e-6 floor of the plain softmax kernel would
    swamp it (the shift makes every product of a query small against the stabilisers)."""
    x, y = correlated_pairs(n=64, seed=11)
    d, L = x.shape[1], 64
    q, k = (t[None, None] * d**0.25 for t in (x, y))  # (1, 1, L, d), x = d^(-1/4) q
    v = torch.randn(1, 1, L, 4, generator=torch.Generator().manual_seed(12), dtype=D64)
    exact = exact_attention(q, k, v, causal=True)
    xs, ys = q[0, 0] * d**-0.25, k[0, 0] * d**-0.25
    dense_m = dense_moments(xs, ys)  # not causal pairs: the test only needs fixed parameters
    diag = torch.stack([dense_m[:, :d].diagonal(dim1=-2, dim2=-1)[0], dense_m[:, d : 2 * d].diagonal(
        dim1=-2, dim2=-1)[0], dense_m[0, 2 * d + 2]])[None]
    err = {"favor+": 0.0, "oprf-rescaled": 0.0, "oprf-dense": 0.0, "dense, ε floor": 0.0}
    for draw in range(8):
        P = gaussian_projection(64, d, generator=torch.Generator().manual_seed(draw)).double()
        a, psi = feature_parameters(diag, "oprf-rescaled")
        ad, maps = dense_parameters(dense_m)
        qd, kd = dense_inputs(q, k, maps)
        runs = {"favor+": (q, k, P, "softmax"),
                "oprf-rescaled": (*oprf_inputs(q, k, P, a, psi), "softmax-floorless"),
                "oprf-dense": (*oprf_inputs(qd, kd, P, ad, torch.ones(1, d, dtype=D64)), "softmax-floorless"),
                "dense, ε floor": (*oprf_inputs(qd, kd, P, ad, torch.ones(1, d, dtype=D64)), "softmax")}
        for name, (qq, kk, PP, kernel) in runs.items():
            out = favor_attention(qq, kk, v, PP, kernel=kernel, causal=True)
            err[name] += float((out - exact).norm() / exact.norm()) / 8
    # measured: favor+ 0.945, oprf-rescaled 0.818, oprf-dense 0.535, oprf-dense with the ε floor 0.889
    assert err["oprf-dense"] < 0.75 * err["oprf-rescaled"] and err["oprf-dense"] < 0.65 * err["favor+"]
    assert err["dense, ε floor"] > 1.4 * err["oprf-dense"]


def test_dense_pair_moments_count_the_pairs_attention_sees() -> None:
    g = torch.Generator().manual_seed(13)
    q, k = (torch.randn(2, 3, 6, 4, generator=g, dtype=D64) for _ in range(2))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    for causal in (False, True):
        sums, pairs = pair_moment_sums(q, k, causal, mask, dense=True)
        want = torch.zeros(3, 11, 4, dtype=D64)
        for b, i, j in attended_pairs(mask, causal):
            x, y = q[b, :, i] * 4**-0.25, k[b, :, j] * 4**-0.25
            want += torch.cat([x[:, :, None] * x[:, None], y[:, :, None] * y[:, None], x[:, None], y[:, None],
                               (x * y)[:, None]], dim=1)
        assert sums.shape == (3, 11, 4) and torch.allclose(sums, want)
        diag, _ = pair_moment_sums(q, k, causal, mask)
        assert torch.allclose(convert_moments(sums, "oprf"), diag)  # the diagonal ones, from the dense ones


def test_dense_statistics_convert_to_diagonal_ones_but_not_back(tmp_path: Path) -> None:
    dense = calibrated(features="oprf-dense")
    attn = dense.layers[0].attn
    assert attn.feature_moments.shape == (2, 2 * 16 + 3, 16) and (attn.feature_a < -1e-3).all()
    assert not torch.allclose(attn.feature_dense[:, 1, 16], torch.zeros(2, 16))  # a key shift
    rescaled = convert_attention(dense, features="oprf-rescaled")
    direct = calibrated(features="oprf-rescaled")
    for a, b in zip(rescaled.layers, direct.layers, strict=True):
        assert torch.allclose(a.attn.feature_psi, b.attn.feature_psi, rtol=1e-4)
        assert torch.allclose(a.attn.feature_a, b.attn.feature_a, rtol=1e-4)
    back = convert_attention(direct, features="oprf-dense")  # diagonal statistics cannot give M: uncalibrated
    assert float(back.layers[0].attn.feature_pairs) == 0 and torch.equal(back.layers[0].attn.feature_a,
                                                                         torch.zeros(2))
    path = save_checkpoint(direct, tmp_path / "rescaled.ckpt", "test")
    with pytest.raises(ValueError, match="--features oprf-dense --calibrate FASTA") as err:
        load_model(path, features="oprf-dense")  # what a tool does with --features oprf-dense
    assert "rescaled.ckpt" in str(err.value) and "\n" not in str(err.value)
    as_oprf = load_model(save_checkpoint(dense, tmp_path / "dense.ckpt", "test"), features="oprf")  # dense -> diagonal
    assert as_oprf.config.features == "oprf" and (as_oprf.layers[0].attn.feature_a < 0).all()


def tiny(causal: bool = True, features: str = "oprf-rescaled", kernel: str = "softmax", depth: int = 2) -> PerformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=depth, heads=2, ff_dim=64, attention="exact", kernel=kernel, causal=causal,
                      num_features=32, max_positions=64)
    exact = PerformerLM(cfg)
    for p in exact.parameters():  # larger q/k than the 0.02 init: sharp attention, A* clearly below 0
        p.data.mul_(8.0) if p.dim() == 2 else None
    return convert_attention(exact, "favor", features=features).eval() if features else exact.eval()


def calibrated(causal: bool = True, features: str = "oprf-rescaled") -> PerformerLM:
    model = tiny(causal, features)
    calibrate_features(model, [torch.randint(4, 24, (4, 30), generator=torch.Generator().manual_seed(6))])
    return model


def test_calibration_sets_a_and_psi_per_layer_and_head() -> None:
    model = calibrated()
    for block in model.layers:
        attn = block.attn
        assert attn.feature_a.shape == (2,) and (attn.feature_a < -1e-3).all()
        a, psi = feature_parameters(attn.feature_moments.double(), "oprf-rescaled")
        assert torch.allclose(attn.feature_a, a.float()) and not torch.allclose(psi, torch.ones_like(psi))
    oprf = convert_attention(model, features="oprf")  # the statistics are kept; A computed without Ψ
    assert torch.equal(oprf.layers[0].attn.feature_psi, torch.ones(2, 16))
    assert torch.equal(oprf.layers[0].attn.feature_moments, model.layers[0].attn.feature_moments)


@pytest.mark.parametrize("features", ["oprf-rescaled", "oprf-dense"])
def test_module_paths_agree_noncausal_causal_decoding_autocast_compile(features: str) -> None:
    model = calibrated(causal=True, features=features)
    attn = model.layers[1].attn
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = attn(x)
        state, steps = attn.init_state(2), []
        for t in range(11):
            y, state = attn.step(x[:, t : t + 1], state)
            steps.append(y)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        attn.causal = False  # the same weights and statistics, bidirectional: its last row sees what causal's does
        assert torch.allclose(attn(x)[:, -1], full[:, -1], atol=1e-5)
        attn.causal = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x)
        assert low.dtype == torch.bfloat16 and (low.float() - full).abs().max() < 0.05 * full.abs().max()
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=False)
    y = compiled(x)
    y.sum().backward()
    assert torch.allclose(y, full, atol=1e-5) and torch.isfinite(attn.qkv.weight.grad).all()


@pytest.mark.parametrize("features", ["oprf-rescaled", "oprf-dense"])
def test_attention_maps_use_the_features(features: str) -> None:
    from proteinperformer.analysis.maps import attention_maps

    model = calibrated(causal=False, features=features)
    maps = attention_maps(model, "MKTAYIAKQRQISFVK")
    favor_plus = attention_maps(convert_attention(model, features="favor+"), "MKTAYIAKQRQISFVK")
    assert not torch.allclose(maps[0], favor_plus[0])
    tokens = model.alphabet.get_batch_converter()([("a", "MKTAYIAKQRQISFVK")])[2]
    layer = model.layers[0].attn
    h = model.embed(tokens)
    q, k, _ = layer.split_heads(model.layers[0].norm1(h))
    with torch.no_grad():
        want = favor_weights(*layer.feature_inputs(q, k), kernel=layer.favor_kernel)[0, :, 1:-1, 1:-1]
    assert torch.allclose(maps[0], want.float(), atol=1e-5)


@pytest.mark.parametrize("features", ["oprf-rescaled", "oprf-dense"])
def test_a_calibrated_checkpoint_keeps_its_statistics_and_old_checkpoints_load_identically(tmp_path: Path,
                                                                                           features: str) -> None:
    model = calibrated(features=features)
    save_checkpoint(model, tmp_path / "c.ckpt", "test")
    back = load_model(tmp_path / "c.ckpt")
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    tokens = torch.randint(4, 24, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(tokens)["logits"], model(tokens)["logits"])
    old = convert_attention(model, features="favor+")  # a checkpoint from before the features field
    save_checkpoint(old, tmp_path / "old.ckpt", "test")
    ckpt = read_torch(tmp_path / "old.ckpt")
    del ckpt["hyper_parameters"]["config"]["features"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = load_model(tmp_path / "old.ckpt")
    assert loaded.config.features == "favor+" and loaded.state_dict().keys() == old.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(tokens)["logits"], old(tokens)["logits"])


def test_training_from_scratch_updates_the_statistics_at_redraws_only() -> None:
    """A batch's own statistics never change its own output: they wait for the next redraw."""
    model = tiny(features="oprf").train()
    tokens = torch.randint(4, 24, (3, 25), generator=torch.Generator().manual_seed(8))
    before = model(tokens)["logits"]
    attn = model.layers[0].attn
    assert float(attn.pending_pairs) == 3 * 25 * 26 / 2 and float(attn.feature_pairs) == 0
    assert torch.equal(model(tokens)["logits"], before)  # statistics pending, A still 0
    assert redraw_projections(model, seed=0, step=1) == 2
    assert (attn.feature_a < 0).all() and float(attn.pending_pairs) == 0 and "pending_moments" not in model.state_dict()
    a = attn.feature_a.clone()
    model(tokens)
    redraw_projections(model, seed=0, step=2)
    assert torch.allclose(attn.feature_a, a, rtol=1e-5)  # the same batch again: the running average stays


# ----------------------------------------------------------------------------- pp-convert --features --calibrate

FASTA = ">a\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>b\nMSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQKDW\n"


@pytest.fixture
def exact_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tiny(features=""), tmp_path / "exact.ckpt", "test")


def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        convert.main(argv)
    assert exc.value.code not in (0, None)
    text = str(exc.value.code) if isinstance(exc.value.code, str) else capsys.readouterr().err
    assert text.startswith("error: ") and len(text.strip().splitlines()) == 1
    return text


def test_convert_calibrates_and_every_loader_uses_the_frozen_statistics(exact_ckpt: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "cal.fasta"
    fasta.write_text(FASTA)
    out = tmp_path / "oprf.ckpt"
    convert.main([str(exact_ckpt), str(out), "--features", "oprf", "--calibrate", str(fasta)])
    model = load_model(out)
    assert model.config.features == "oprf" and (model.layers[0].attn.feature_a < 0).all()
    assert float(model.layers[0].attn.feature_pairs) == 35 * 36 / 2 + 38 * 39 / 2  # causal pairs of <cls>…<eos>
    convert.main([str(exact_ckpt), "--report", str(fasta), "--features", "oprf-rescaled", "--calibrate", str(fasta),
                  "--draws", "1", "--report-json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["features"] == "oprf-rescaled" and r["calibration"] == str(fasta) and len(r["layer_rel_error_mean"]) == 2
    plain = load_model(out, features="favor+")
    assert plain.config.features == "favor+" and torch.equal(plain.layers[0].attn.projection,
                                                             model.layers[0].attn.projection)


def test_convert_refuses_bad_calibration_input(exact_ckpt: Path, tmp_path: Path, capsys) -> None:
    bad, empty = tmp_path / "bad.fasta", tmp_path / "empty.fasta"
    bad.write_text(">a\nMKTAJYIAK\n")
    empty.write_text("")
    out = str(tmp_path / "o.ckpt")
    base = [str(exact_ckpt), out, "--features", "oprf"]
    assert "bad.fasta" in error_of(base + ["--calibrate", str(bad)], capsys)
    assert "empty.fasta" in error_of(base + ["--calibrate", str(empty)], capsys)
    assert "--calibrate" in error_of(base, capsys)  # no calibration: refused, not silently FAVOR+
    relu = save_checkpoint(tiny(features="", kernel="relu"), tmp_path / "relu.ckpt", "test")
    # an exact source converts to softmax by default (own_kernel); asking for relu with FAVOR++ is refused
    assert "relu" in error_of([str(relu), out, "--kernel", "relu", "--features", "oprf", "--calibrate", str(bad)],
                              capsys)
    flat = save_checkpoint(tiny(features="", depth=0), tmp_path / "flat.ckpt", "test")
    assert "no attention layers" in error_of([str(flat), out, "--features", "oprf", "--calibrate", str(bad)], capsys)
    assert not Path(out).exists()
    with pytest.raises(ValueError, match="calibrate"):  # a tool asked for FAVOR++ on an uncalibrated model
        load_model(exact_ckpt, attention="favor", features="oprf")


def test_a_tagged_gpt2_model_calibrates_on_tagged_sequences_and_generates(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from proteinperformer.cli import generate
    from tests.test_gpt2_import import SEQS, write_gpt2

    write_gpt2(tmp_path / "iglm")
    fasta = tmp_path / "tagged.fasta"
    fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(SEQS)))
    out = tmp_path / "iglm_oprf.ckpt"
    convert.main([str(tmp_path / "iglm"), str(out), "--features", "oprf-rescaled", "--calibrate", str(fasta),
                  "--num-features", "32"])
    model = load_model(out)
    lengths = [len(model.alphabet.encode(s)) + 2 for s in SEQS]  # tags are one token each; <cls> … <eos>
    assert float(model.layers[0].attn.feature_pairs) == sum(n * (n + 1) / 2 for n in lengths)
    samples = tmp_path / "samples.fasta"
    generate.main([str(out), str(samples), "--prompt", "[HEAVY][HUMAN]EVQ", "--no-cls", "--num-samples", "2",
                   "--max-length", "12", "--features", "oprf"])
    assert samples.read_text().count(">") == 2
