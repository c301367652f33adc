"""The sliding-window hybrid (attention/window.py, pp-convert --window): exact softmax over the last W keys plus
feature attention over older ones, one normaliser. Checked against a float64 reference written from the definition,
exact attention (W ≥ L), plain FAVOR (W = 0), token-by-token decoding, packed documents, padding, gradients,
autocast, checkpoints and the CLI; bad settings give one line."""

from __future__ import annotations

import math

import pytest
import torch

from proteinperformer.attention import MultiheadSelfAttention
from proteinperformer.attention.features import positive_random_features
from proteinperformer.attention.oprf import oprf_features, pair_moment_sums
from proteinperformer.attention.window import window_attention
from proteinperformer.checkpoints import load_model, save_checkpoint
from proteinperformer.cli import convert
from proteinperformer.inference.generate import init_states, step_logits
from proteinperformer.model import ModelConfig, PerformerLM, convert_attention
from tests.test_esm_import import write_fair_esm
from tests.test_gpt2_import import write_gpt2
from tests.test_transfer import CALIBRATION, write_fasta

FEATURES = ("favor+", "oprf-rescaled", "oprf-dense")
H, D = 2, 8  # heads, head_dim


def _layer(features: str = "favor+", window: int = 4, m: int = 32, dtype=torch.float64, seed: int = 0,
           rotary: bool = False) -> MultiheadSelfAttention:
    """A causal softmax-kernel layer with large-norm q, k (sharp attention), FAVOR++ calibrated on random inputs."""
    torch.manual_seed(seed)
    attn = MultiheadSelfAttention(H * D, H, "favor", "softmax", num_features=m, causal=True, features=features,
                                  window=window, rotary=rotary).to(dtype)
    with torch.no_grad():
        attn.qkv.weight.mul_(8.0)
        if features != "favor+":
            q, k, _ = attn.split_heads(torch.randn(4, 30, H * D, dtype=dtype))
            sums, pairs = pair_moment_sums(q, k, True, None, dense=features == "oprf-dense")
            attn.set_feature_moments(sums / pairs, pairs)
    return attn.eval()


def _reference(attn: MultiheadSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """y_i from the definition in float64, one query at a time: exact exp(qᵀk/√d) on keys i − W < j ≤ i, and the
    plain (unstabilised) feature map's φ(q)ᵀφ(k) on keys j ≤ i − W: FAVOR+'s m^(-1/2) exp(ωᵀx − ‖x‖²/2), FAVOR++'s
    (1 − 4A)^(d/4) exp(A‖ω‖² + √(1 − 4A) ωᵀx − ‖x‖²/2) on Ψx, Ψ⁻¹y, and for oprf-dense on Mx and M⁻ᵀy − c, times
    exp(xᵀMc) (the shift xᵀ(y − c) − xᵀy that its key shift puts on every product). Then the attention's output
    projection."""
    q, k, v = (t.double() for t in attn.split_heads(x.double()))
    B, _, L, d = q.shape
    W, P = attn.window, attn.projection.double()
    y = torch.zeros(B, H, L, d, dtype=torch.float64)
    for h in range(H):
        xq, xk = q[:, h] * d**-0.25, k[:, h] * d**-0.25
        shift = torch.zeros(B, L, dtype=torch.float64)
        if attn.features == "favor+":
            fq, fk = positive_random_features(xq, P), positive_random_features(xk, P)
        else:
            a = float(attn.feature_a[h])
            if attn.features == "oprf-dense":
                M, Mi, c = (attn.feature_dense[h, 0, :d].double(), attn.feature_dense[h, 1, :d].double(),
                            attn.feature_dense[h, 1, d].double())
                xq, xk = xq @ M.T, xk @ Mi.T - c
                shift = xq @ c
            else:
                psi = attn.feature_psi[h].double()
                xq, xk = xq * psi, xk / psi
            fq, fk = oprf_features(xq, P, a), oprf_features(xk, P, a)
        for i in range(L):
            w = torch.exp((q[:, h, i : i + 1] * k[:, h, max(0, i - W + 1) : i + 1]).sum(-1) / math.sqrt(d))  # (B, w)
            f = (fq[:, i : i + 1] * fk[:, : max(0, i - W + 1)]).sum(-1) * shift[:, i : i + 1].exp()  # (B, old)
            num = (w.unsqueeze(-1) * v[:, h, max(0, i - W + 1) : i + 1]).sum(1) + (
                f.unsqueeze(-1) * v[:, h, : max(0, i - W + 1)]).sum(1)
            y[:, h, i] = num / (w.sum(1) + f.sum(1)).unsqueeze(-1)
    return attn._merge(y.to(x.dtype))


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("window", [1, 3, 8])
def test_hybrid_equals_its_float64_definition(features: str, window: int) -> None:
    attn = _layer(features, window)
    x = torch.randn(2, 21, H * D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference(attn, x), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("features", FEATURES)
def test_a_window_as_long_as_the_sequence_is_exact_softmax_attention(features: str) -> None:
    attn = _layer(features, window=64, dtype=torch.float32)
    x = torch.randn(2, 40, H * D)
    attn.attention = "exact"
    with torch.no_grad():
        exact = attn(x)
        attn.attention = "favor"
        assert (attn(x) - exact).abs().max() <= 1e-5
        attn.window = 40  # W = L: the feature term is empty too
        assert (attn(x) - exact).abs().max() <= 1e-5


def test_window_zero_is_plain_favor() -> None:
    windowed, plain = _layer("oprf-dense", window=0, dtype=torch.float32), _layer("oprf-dense", window=5,
                                                                                  dtype=torch.float32)
    plain.load_state_dict(windowed.state_dict())
    plain.window = 0
    x = torch.randn(2, 33, H * D)
    with torch.no_grad():
        assert torch.equal(windowed(x), plain(x))
        plain.window = 5
        assert (windowed(x) - plain(x)).abs().max() > 1e-3  # the window changes something


@pytest.mark.parametrize("features", FEATURES)
def test_decoding_token_by_token_equals_the_full_forward(features: str) -> None:
    attn = _layer(features, window=5, dtype=torch.float32, rotary=True)
    x = torch.randn(3, 30, H * D)
    with torch.no_grad():
        full = attn(x)
        state = attn.init_state(3)
        for t in range(x.shape[1]):
            y, state = attn.step(x[:, t : t + 1], state)
            assert (y[:, 0] - full[:, t]).abs().max() <= 1e-5 * full.abs().max(), t  # float32 rounding
    assert state.k.shape[2] == 5 and state.position == 30  # the ring buffer holds the last W keys


def test_packed_documents_equal_each_protein_alone_and_padding_changes_nothing() -> None:
    attn = _layer("oprf-dense", window=4, dtype=torch.float32)
    lengths = [3, 9, 1, 12]
    docs = [torch.randn(1, n, H * D) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = attn(torch.cat(docs, 1), cu_seqlens=cu)
        alone = torch.cat([attn(d) for d in docs], 1)
        assert (packed - alone).abs().max() <= 1e-5
        batch = torch.zeros(2, 12, H * D)
        batch[0, :9], batch[1] = docs[1][0], docs[3][0]
        padding = torch.zeros(2, 12, dtype=torch.bool)
        padding[0, 9:] = True
        padded = attn(batch, key_padding_mask=padding)
        assert (padded[0, :9] - alone[:, 3:12]).abs().max() <= 1e-5
        assert (padded[1] - alone[0, 13:]).abs().max() <= 1e-5


def test_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    B, L, d, m = 1, 9, 4, 6
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ql, kl = (torch.randn(B, H, L, m, dtype=torch.float64, requires_grad=True) for _ in range(2))
    shift = torch.randn(B, H, L, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    for window in (1, 3):
        for kw in ({}, {"cu_seqlens": cu}):
            assert torch.autograd.gradcheck(
                lambda *t, w=window, kw=kw: window_attention(*t, w, **kw), (q, k, v, ql, kl, shift))


def test_bf16_autocast_tracks_float32_and_returns_bf16() -> None:
    attn = _layer("favor+", window=4, dtype=torch.float32)
    x = torch.randn(2, 50, H * D)
    with torch.no_grad():
        ref = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attn(x)
    assert y.dtype == torch.bfloat16 and (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_model_decodes_as_it_runs_and_the_checkpoint_keeps_the_window(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, num_features=16, max_positions=64, causal=True,
                      attention="exact")
    model = convert_attention(PerformerLM(cfg).eval(), "favor", 16, "softmax", window=6)
    assert model.config.attention_window == 6 and all(b.attn.window == 6 for b in model.layers)
    path = save_checkpoint(model, tmp_path / "w.ckpt", "test")
    loaded = load_model(path).eval()
    assert loaded.config.attention_window == 6
    tokens = torch.randint(5, 25, (2, 30))
    with torch.no_grad():
        full = loaded(tokens)["logits"]
    torch.testing.assert_close(full, model(tokens)["logits"].detach())
    states = init_states(loaded, 2)
    for t in range(tokens.shape[1]):
        logits, states = step_logits(loaded, tokens[:, t], t, states)
        assert (logits - full[:, t]).abs().max() <= 1e-4, t
    assert convert_attention(loaded, "favor", 16, "softmax", window=0).config.attention_window == 0


def test_pp_convert_transfers_with_the_window_in_place(tmp_path) -> None:
    from proteinperformer.cli.generate import main as pp_generate

    src = tmp_path / "tiny_iglm"
    write_gpt2(src)
    calib = write_fasta(tmp_path / "c.fasta", [s[:40] for s in CALIBRATION], prefix="[HEAVY][HUMAN]")
    out = tmp_path / "w.ckpt"
    convert.main([str(src), "--out", str(out), "--transfer", str(calib), "--transfer-steps", "10",
                  "--num-features", "16", "--no-cls", "--window", "4"])
    model = load_model(out)
    assert model.config.attention_window == 4 and model.config.transferred
    pp_generate([str(out), str(tmp_path / "gen.fasta"), "--num-samples", "2", "--max-length", "12",
                 "--prompt", "[HEAVY][HUMAN]EVQ", "--no-cls", "--seed", "0"])
    assert (tmp_path / "gen.fasta").read_text().count(">") == 2


def test_bad_window_settings_are_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="causal models only"):
        MultiheadSelfAttention(16, 2, "favor", "softmax", causal=False, window=4)
    for kernel in ("relu", "hedgehog"):
        with pytest.raises(ValueError, match="exp-type feature map"):
            MultiheadSelfAttention(16, 2, "favor", kernel, num_features=8, causal=True, window=4)
    with pytest.raises(ValueError, match="integer >= 0"):
        MultiheadSelfAttention(16, 2, "favor", "softmax", causal=True, window=-1)
    src = tmp_path / "tiny_iglm"
    write_gpt2(src)
    for args, says in ((["--window", "4", "--attention", "exact"], "--window 4 is a FAVOR setting"),
                       (["--window", "-2"], "--window must be 0"),
                       (["--window", "4", "--kernel", "relu"], "exp-type feature map"),
                       (["--window", "4", "--report", str(src)], "leave out --window")):
        with pytest.raises(SystemExit) as err:
            convert.main([str(src), "--out", str(tmp_path / "x.ckpt"), *args])
        text = str(err.value)
        assert text.startswith("error: ") and says in text and "\n" not in text, text
    (tmp_path / "esm").mkdir()
    esm = write_fair_esm(tmp_path / "esm", layers=1, dim=16, heads=2)[0]  # noncausal (MLM): no window
    for extra in ([], ["--transfer", str(write_fasta(tmp_path / "c.fasta", CALIBRATION[:2]))]):
        with pytest.raises(SystemExit) as err:
            convert.main([str(esm), "--out", str(tmp_path / "e.ckpt"), "--window", "4", *extra])
        text = str(err.value)
        assert text.startswith(f"error: {esm}: ") and "causal models only" in text and "\n" not in text, text


def test_attention_maps_of_a_windowed_model() -> None:
    from proteinperformer.analysis import attention_maps
    from tests.test_analysis import SEQ, tiny_model

    exact = tiny_model(attention="exact", causal=True)
    wide = convert_attention(exact, "favor", 16, "softmax", window=len(SEQ) + 2)
    torch.testing.assert_close(attention_maps(wide, SEQ), attention_maps(exact, SEQ), atol=1e-5, rtol=1e-4)
    narrow = convert_attention(exact, "favor", 16, "softmax", window=4)
    full = attention_maps(narrow, SEQ, block_size=4096)
    torch.testing.assert_close(attention_maps(narrow, SEQ, block_size=13), full, atol=1e-6, rtol=1e-5)
    assert full.triu(1).abs().max() == 0 and full.sum(-1).max() <= 1 + 1e-5
    assert (full - attention_maps(exact, SEQ)).abs().max() > 1e-3  # the features do the older keys
