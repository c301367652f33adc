"""Tests for proteinperformer.attention: FAVOR+ kernel statistics, accuracy on sharp attention, every fast path
against the reference (attention/reference.py), the feature-map registry, causal chunking and gradients, padding,
step decoding, low precision, redraw and input checks."""

from types import SimpleNamespace

import pytest
import torch

from proteinperformer.attention import (
    MultiheadSelfAttention,
    exact_attention,
    favor_attention,
    favor_step,
    features,
    gaussian_projection,
    noncausal,
    positive_random_features,
    redraw_projections,
)
from proteinperformer.attention.features import FeatureMap, register
from proteinperformer.attention.reference import favor_reference
from proteinperformer.training.callbacks import FeatureRedrawCallback


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def clustered_qkv(n_clusters=8, L=256, d=32, scale=1.5, noise=0.1, seed=0):
    """q, k near a few cluster centres with large norm: each query attends sharply to its own cluster."""
    g = gen(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g, dtype=torch.float64), dim=-1)
    a, b = torch.randint(n_clusters, (L,), generator=g), torch.randint(n_clusters, (L,), generator=g)
    q = (centers[a] + noise * torch.randn(L, d, generator=g, dtype=torch.float64) / d**0.5) * scale * d**0.25
    k = (centers[b] + noise * torch.randn(L, d, generator=g, dtype=torch.float64) / d**0.5) * scale * d**0.25
    v = torch.randn(L, 8, generator=g, dtype=torch.float64)
    return q[None, None], k[None, None], v[None, None]


# ----------------------------------------------------------------------------- projection


def test_projection_orthogonal_blocks_and_norms():
    d, m = 16, 40
    P = gaussian_projection(m, d, orthogonal=True, generator=gen(0))
    assert P.shape == (m, d) and P.dtype == torch.float32
    u = torch.nn.functional.normalize(P.double(), dim=1)
    for s in range(0, m, d):  # rows within each block are orthogonal
        blk = u[s : s + d]
        assert torch.allclose(blk @ blk.T, torch.eye(len(blk), dtype=torch.float64), atol=1e-5)
    P1 = gaussian_projection(m, d, orthogonal=True, scaling=1)
    assert torch.allclose(P1.norm(dim=1), torch.full((m,), d**0.5), atol=1e-4)
    big = gaussian_projection(2048, d, orthogonal=True, generator=gen(1))
    assert abs(big.pow(2).sum(1).mean().item() - d) < 0.5  # χ² norms: E‖ω‖² = d
    assert torch.equal(gaussian_projection(m, d, generator=gen(3)), gaussian_projection(m, d, generator=gen(3)))
    assert gaussian_projection(m, d, orthogonal=False).shape == (m, d)


# ----------------------------------------------------------------------------- kernel statistics


def _kernel_estimates(q, k, m, orthogonal, draws, seed):
    """φ(q)·φ(k) for `draws` independent projections of m features: (draws, ...)"""
    d = q.shape[-1]
    P = gaussian_projection(m * draws, d, orthogonal=orthogonal, generator=gen(seed)).double()
    # independent blocks of m rows (m is a multiple of d, so each orthogonal block is one draw)
    fq = positive_random_features(q, P).unflatten(-1, (draws, m)) * draws**0.5  # φ with m^(-1/2), per draw
    fk = positive_random_features(k, P).unflatten(-1, (draws, m)) * draws**0.5
    return (fq * fk).sum(-1).movedim(-1, 0)


def test_kernel_estimate_is_unbiased():
    d, draws = 8, 3000
    g = gen(0)
    q, k = torch.nn.functional.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=-1)
    q, k = 0.9 * q, 0.9 * (k + q)  # moderate norms, qᵀk ≈ 0.8: the estimator's variance stays finite-sample sane
    exact = torch.exp(q @ k)
    for orthogonal in (True, False):
        est = _kernel_estimates(q, k, d, orthogonal, draws, seed=1)
        bound = 4 * est.std() / draws**0.5
        assert abs(est.mean() - exact) < bound, (orthogonal, est.mean().item(), exact.item())
    # a biased map would fail: e.g. dropping the ‖x‖²/2 correction
    assert abs(est.mean() * torch.exp(0.5 * (q @ q + k @ k)) - exact) > bound


def test_kernel_variance_falls_with_m_and_orthogonal_beats_iid():
    d = 16
    g = gen(2)
    q, k = 0.7 * torch.nn.functional.normalize(torch.randn(2, 64, d, generator=g, dtype=torch.float64), dim=-1)
    exact = torch.exp((q * k).sum(-1))
    mse = {}
    for orthogonal in (True, False):
        for m in (16, 64, 256):
            est = _kernel_estimates(q, k, m, orthogonal, draws=200, seed=m + orthogonal)
            mse[orthogonal, m] = ((est - exact) ** 2).mean().item()
    for orthogonal in (True, False):
        assert mse[orthogonal, 16] > 2 * mse[orthogonal, 64] > 4 * mse[orthogonal, 256]
    for m in (16, 64, 256):
        assert mse[True, m] < mse[False, m], (m, mse)


# ----------------------------------------------------------------------------- output accuracy


def test_output_error_on_sharp_attention_falls_with_m():
    q, k, v = clustered_qkv()
    exact = exact_attention(q, k, v)
    baseline = rel_err(v.mean(2, keepdim=True).expand_as(exact), exact)  # attention is far from uniform
    assert baseline > 0.8
    errs = []
    for m in (16, 64, 256):
        e = [rel_err(favor_attention(q, k, v, gaussian_projection(m, 32, generator=gen(s))), exact) for s in range(6)]
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * baseline, (errs, baseline)


def test_reference_is_the_design_definition():
    """reference.py against DESIGN §2 written out: relu(x'Pᵀ) + 1e-3 exactly, and for the softmax kernel the
    unstabilised positive random features, which it matches up to the ε floor (the stabilisers only scale ε)."""
    q, k, v = torch.randn(3, 1, 2, 30, 8, dtype=torch.float64, generator=gen(4)).unbind(0)
    x_q, x_k = q * 8**-0.25, k * 8**-0.25

    def attend(fq, fk, causal):  # normalised quadratic form of the features
        w = fq @ fk.transpose(-1, -2)
        w = w.tril() if causal else w
        return (w @ v) / w.sum(-1, keepdim=True)

    P = gaussian_projection(16, 8, generator=gen(0)).double()
    for causal in (False, True):
        for proj in (None, P):
            fq, fk = (torch.relu(x if proj is None else x @ proj.T) + 1e-3 for x in (x_q, x_k))
            ref = favor_reference(q, k, v, proj, kernel="relu", causal=causal)
            assert torch.allclose(ref, attend(fq, fk, causal), atol=1e-12)
        ref = favor_reference(q, k, v, P, causal=causal)
        definition = attend(positive_random_features(x_q, P), positive_random_features(x_k, P), causal)
        assert rel_err(ref, definition) < 1e-4
        wrong = attend(torch.exp(x_q @ P.T), torch.exp(x_k @ P.T), causal)  # logits without −‖x‖²/2
        assert rel_err(ref, wrong) > 1e-2


MAPS = [("softmax", True), ("relu", True), ("relu", False)]  # (kernel, with a projection)
PATHS = [(False, None, 4096), (True, 4, 8), (True, 5, 15), (True, 16, 1024), (True, 64, 64)]  # causal, chunk, group


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal,chunk_size,group_size", PATHS, ids=lambda p: str(p))
@pytest.mark.parametrize("kernel,projected", MAPS, ids=["softmax", "relu", "relu-noproj"])
def test_fast_paths_match_reference(kernel, projected, causal, chunk_size, group_size, masked, monkeypatch):
    """Forward and backward of every fast path equal reference.py in float64: noncausal (the fused softmax one in
    several row blocks), chunked causal with groups, key padding on either side."""
    monkeypatch.setattr(noncausal, "ROW_BLOCK_ELEMENTS", 1)  # 64-row blocks: L = 70 takes two
    g = gen(5)
    q, k, v = (torch.randn(2, 2, 70, 8, dtype=torch.float64, generator=g) for _ in range(3))
    P = gaussian_projection(16, 8, generator=gen(0)).double() if projected else None
    mask = None
    if masked:
        mask = torch.zeros(2, 70, dtype=torch.bool)
        mask[0, :3], mask[1, 50:] = True, True  # left and right padding
    kw = dict(kernel=kernel, causal=causal, key_padding_mask=mask)
    outs, grads = [], []
    for fn in (lambda *a: favor_attention(*a, P, chunk_size=chunk_size, group_size=group_size, **kw),
               lambda *a: favor_reference(*a, P, **kw)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([t.grad for t in leaves])
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()
    if masked and causal:
        assert outs[0][0, :, :3].abs().max() == 0  # the first queries of the left-padded row see no key at all


def test_registering_a_feature_map_is_all_it_takes(monkeypatch):
    """A new feature map is one class: once registered, favor_attention (noncausal and chunked causal), favor_step,
    the attention layer and the reference all use it by name, and the fast paths agree with the reference."""
    monkeypatch.setattr(features, "FEATURE_MAPS", dict(features.FEATURE_MAPS))  # registrations end with the test

    @register
    class Squared(FeatureMap):  # φ(x) = (x'Pᵀ)² + ε: positive and unlike either built-in map
        name = "squared"
        eps = 1e-2

        def features(self, x, P):
            x = x * x.shape[-1] ** -0.25
            return (x if P is None else x @ P.to(x.dtype).T) ** 2 + self.eps

    with pytest.raises(ValueError, match="already registered"):
        register(Squared)
    g = gen(9)
    q, k, v = (torch.randn(2, 2, 40, 8, dtype=torch.float64, generator=g) for _ in range(3))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 30:] = True
    for P in (None, gaussian_projection(12, 8, generator=gen(0)).double()):
        for causal in (False, True):
            kw = dict(kernel="squared", causal=causal, key_padding_mask=mask)
            out = favor_attention(q, k, v, P, chunk_size=8, group_size=16, **kw)
            assert torch.allclose(out, favor_reference(q, k, v, P, **kw), atol=1e-10)
            assert rel_err(out, favor_attention(q, k, v, P, kernel="relu", causal=causal, key_padding_mask=mask)) > 0.01
        state, rows = None, []
        for t in range(40):
            o, state = favor_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], P, state, "squared")
            rows.append(o)
        assert torch.allclose(torch.cat(rows, 2), favor_reference(q, k, v, P, "squared", causal=True), atol=1e-10)
    layer = MultiheadSelfAttention(32, 4, kernel="squared", use_projection=False, causal=True).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        state, ys = layer.init_state(2), []
        for t in range(10):
            y, state = layer.step(x[:, t : t + 1], state)
            ys.append(y)
        assert torch.allclose(torch.cat(ys, 1), layer(x), atol=1e-5)
    registered = r"registered feature maps: \['hedgehog', 'relu', 'softmax', 'softmax-floorless', 'squared'\]"
    with pytest.raises(ValueError, match=registered):
        favor_attention(q, k, v, None, kernel="cosine")


def test_cross_attention_shapes_and_identity_values_recover_rows():
    B, H, Lq, Lk, d = 2, 3, 5, 40, 16
    q, k = torch.randn(2, B, H, Lk, d).unbind(0)
    P = gaussian_projection(64, d, generator=gen(0))
    full = favor_attention(q, k, torch.eye(Lk).expand(B, H, Lk, Lk), P)  # (B, H, Lk, Lk) attention matrix
    rows = favor_attention(q[:, :, :Lq], k, torch.eye(Lk).expand(B, H, Lk, Lk), P)
    assert rows.shape == (B, H, Lq, Lk)
    assert torch.allclose(rows, full[:, :, :Lq], atol=1e-6)
    assert torch.allclose(rows.sum(-1), torch.ones(B, H, Lq), atol=1e-5)
    v = torch.randn(B, H, Lk, 7)
    assert torch.allclose(full @ v, favor_attention(q, k, v, P), atol=1e-4)


# ----------------------------------------------------------------------------- causal


def test_causal_equals_noncausal_on_every_prefix_and_chunk_size_is_irrelevant():
    q, k, v = torch.randn(3, 2, 2, 45, 16).unbind(0)
    P = gaussian_projection(32, 16, generator=gen(0))
    out = favor_attention(q, k, v, P, causal=True, chunk_size=8)
    for T in (1, 5, 16, 64):
        assert torch.allclose(favor_attention(q, k, v, P, causal=True, chunk_size=T), out, atol=1e-5)
    for i in (0, 1, 7, 8, 30, 44):
        prefix = favor_attention(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], P)
        assert torch.allclose(out[:, :, i], prefix[:, :, i], atol=1e-5), i


def test_causal_grad_of_future_keys_is_zero():
    L = 24
    q, k, v = (torch.randn(1, 2, L, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    P = gaussian_projection(16, 8, generator=gen(0)).double()
    i = 10
    favor_attention(q, k, v, P, causal=True, chunk_size=4)[:, :, i].sum().backward()
    assert k.grad[:, :, i + 1 :].abs().max() == 0 and v.grad[:, :, i + 1 :].abs().max() == 0
    assert q.grad[:, :, i + 1 :].abs().max() == 0
    assert k.grad[:, :, : i + 1].abs().max() > 0


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_mixed_length_batch_equals_each_sequence_alone(causal, kernel):
    lengths, L, H, d = [37, 64, 50], 64, 2, 16
    g = gen(7)
    q, k, v = (3 * torch.randn(len(lengths), H, L, d, generator=g) for _ in range(3))
    mask = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
    P = gaussian_projection(32, d, generator=gen(0))
    out = favor_attention(q, k, v, P, kernel=kernel, causal=causal, key_padding_mask=mask, chunk_size=16)
    for b, n in enumerate(lengths):
        alone = favor_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], P,
                                kernel=kernel, causal=causal)
        assert (out[b : b + 1, :, :n] - alone).abs().max() <= 1e-5
    # padded keys with huge logits must not leak through the key stabiliser either
    k2 = k.masked_fill(mask[:, None, :, None], 50.0)
    out2 = favor_attention(q, k2, v, P, kernel=kernel, causal=causal, key_padding_mask=mask)
    real = ~mask[:, None, :, None]
    assert torch.allclose(out.masked_fill(~real, 0), out2.masked_fill(~real, 0), atol=1e-5)


def test_exact_attention_mask_convention():
    q, k, v = torch.randn(3, 2, 2, 10, 8).unbind(0)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    out = exact_attention(q, k, v, key_padding_mask=mask)
    w = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(mask[:, None, None, :], -torch.inf), -1)
    assert torch.allclose(out, w @ v, atol=1e-5)
    out_c = exact_attention(q, k, v, causal=True, key_padding_mask=mask)
    alone = exact_attention(q[1:, :, :6], k[1:, :, :6], v[1:, :, :6], causal=True)
    assert torch.allclose(out_c[1:, :, :6], alone, atol=1e-5)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_step_decoding_equals_full_causal(kernel):
    q, k, v = (2 * torch.randn(2, 2, 30, 16) for _ in range(3))
    P = gaussian_projection(32, 16, generator=gen(0))
    full = favor_attention(q, k, v, P, kernel=kernel, causal=True, chunk_size=8)
    state, outs = None, []
    for t in range(30):
        o, state = favor_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], P, state, kernel)
        outs.append(o)
    assert state.kv.shape == (2, 2, 32, 17)  # O(m·d) state, independent of t
    assert torch.allclose(torch.cat(outs, 2), full, atol=1e-5)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_module_step_equals_forward(attention):
    torch.manual_seed(0)
    mod = MultiheadSelfAttention(32, 4, attention=attention, num_features=32, causal=True).eval()
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        full = mod(x)
        state, ys = mod.init_state(2, x.device, x.dtype), []
        for t in range(20):
            y, state = mod.step(x[:, t : t + 1], state)
            ys.append(y)
    assert torch.allclose(torch.cat(ys, 1), full, atol=1e-5)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_long_sequence_is_finite(dtype, causal):
    L, d = 4096, 32
    g = gen(8)
    q, k, v = (2 * torch.randn(1, 2, L, d, generator=g) for _ in range(3))
    P = gaussian_projection(64, d, generator=gen(0))
    ref = favor_attention(q, k, v, P, causal=causal)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = favor_attention(*leaves, P, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# ----------------------------------------------------------------------------- module and redraw


def test_module_shapes_buffer_and_padding():
    mod = MultiheadSelfAttention(32, 4, num_features=48)
    assert mod.projection.shape == (48, 8) and "projection" in mod.state_dict()
    assert mod.heads == 4 and mod.head_dim == 8 and mod.attention == "favor" and not mod.causal
    x = torch.randn(2, 10, 32)
    q, k, v = mod.split_heads(x)
    assert q.shape == k.shape == v.shape == (2, 4, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 7:] = True
    y = mod(x, key_padding_mask=mask)
    assert y.shape == x.shape
    assert torch.allclose(y[1, :7], mod(x[1:, :7])[0], atol=1e-5)
    assert MultiheadSelfAttention(32, 4, attention="exact").projection is None
    assert MultiheadSelfAttention(32, 4, kernel="relu", use_projection=False).projection is None


def test_redraw_changes_buffer_and_is_deterministic():
    a = MultiheadSelfAttention(32, 4, num_features=24)
    before = a.projection.clone()
    a.redraw_projection(gen(1))
    assert a.projection.shape == before.shape and not torch.equal(a.projection, before)
    nets = [torch.nn.Sequential(MultiheadSelfAttention(32, 4), MultiheadSelfAttention(32, 4)) for _ in range(2)]
    for net in nets:
        assert redraw_projections(net, seed=3, step=2000) == 2
    assert torch.equal(nets[0][0].projection, nets[1][0].projection)
    assert not torch.equal(nets[0][0].projection, nets[0][1].projection)  # layers get distinct draws

    cb = FeatureRedrawCallback(every_n_steps=10, seed=3)
    net = nets[0]
    p0 = net[0].projection.clone()
    cb.on_train_batch_end(SimpleNamespace(global_step=9), net, None, None, 0)
    assert torch.equal(net[0].projection, p0)
    cb.on_train_batch_end(SimpleNamespace(global_step=10), net, None, None, 0)
    p1 = net[0].projection.clone()
    assert not torch.equal(p1, p0)
    cb.on_train_batch_end(SimpleNamespace(global_step=10), net, None, None, 1)  # accumulation: same step
    assert torch.equal(net[0].projection, p1)
    redraw_projections(nets[1], seed=3, step=10)
    assert torch.equal(nets[1][0].projection, p1)  # resume / other rank: same draw from (seed, step)


def test_redraw_seeds_are_a_stream_apart_from_the_data_seeds():
    """The redraw at step s no longer reuses the seed of epoch s's shuffle (seed·1000003 + epoch) or an example's."""
    from proteinperformer.attention.redraw import redraw_seed
    from proteinperformer.data.datasets import example_seed

    redraws = {redraw_seed(seed, step) for seed in range(4) for step in range(0, 5000, 7)}
    assert len(redraws) == 4 * len(range(0, 5000, 7))
    shuffles = {seed * 1_000_003 + epoch for seed in range(4) for epoch in range(5000)}
    examples = {example_seed(seed, a, b) for seed in range(4) for a in range(50) for b in range(50)}
    assert not redraws & shuffles and not redraws & examples
    net = torch.nn.Sequential(MultiheadSelfAttention(32, 4))
    redraw_projections(net, seed=0, step=5)
    same_as_epoch = gaussian_projection(256, 8, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(net[0].projection, same_as_epoch)


# ----------------------------------------------------------------------------- errors


def test_clear_errors_on_bad_input():
    q = torch.randn(1, 2, 8, 16)
    P = gaussian_projection(32, 16)
    with pytest.raises(ValueError, match="4-d"):
        favor_attention(q[0], q, q, P)
    with pytest.raises(ValueError, match="head_dim"):
        favor_attention(q, q[..., :8], q, P)
    registered = (r"unknown kernel 'cosine'; registered feature maps: "
                  r"\['hedgehog', 'relu', 'softmax', 'softmax-floorless'\]")
    with pytest.raises(ValueError, match=registered):
        favor_attention(q, q, q, P, kernel="cosine")
    with pytest.raises(ValueError, match="unknown kernel 'cosine'"):
        MultiheadSelfAttention(32, 4, kernel="cosine")
    with pytest.raises(ValueError, match="projection"):
        favor_attention(q, q, q, gaussian_projection(32, 8))
    with pytest.raises(ValueError, match="needs a projection"):
        favor_attention(q, q, q, None)
    with pytest.raises(ValueError, match="Lq == Lk"):
        favor_attention(q[:, :, :4], q, q, P, causal=True)
    with pytest.raises(ValueError, match="lengths differ"):
        favor_attention(q, q, q[:, :, :4], P)
    with pytest.raises(ValueError, match="key_padding_mask"):
        favor_attention(q, q, q, P, key_padding_mask=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        favor_attention(q, q, q, P, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError):
        MultiheadSelfAttention(30, 4)
    with pytest.raises(ValueError):
        MultiheadSelfAttention(32, 4, attention="linear")
    with pytest.raises(ValueError):
        MultiheadSelfAttention(32, 4)(torch.randn(10, 32))
