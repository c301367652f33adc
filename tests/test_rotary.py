"""Rotary position embeddings: ESM-2's convention, relative positions, the FAVOR+ estimator on rotated q/k,
step decoding with the right position offset, and no length cap."""

import pytest
import torch

from proteinperformer.attention import MultiheadSelfAttention, gaussian_projection, positive_random_features
from proteinperformer.attention.rotary import apply_rotary, inverse_frequencies, rotate_half
from proteinperformer.inference.embed import residue_limit
from proteinperformer.model import ModelConfig, PerformerLM


def test_matches_fair_esm_rotary_embedding():
    from esm.rotary_embedding import RotaryEmbedding

    rot = RotaryEmbedding(16)
    q, k = torch.randn(6, 50, 16), torch.randn(6, 50, 16)  # fair-esm layout (B·H, T, d)
    q_esm, k_esm = rot(q, k)
    assert torch.equal(rot.inv_freq, inverse_frequencies(16))
    assert torch.allclose(apply_rotary(q), q_esm, atol=1e-6)
    assert torch.allclose(apply_rotary(k), k_esm, atol=1e-6)


def test_hand_computed_rotation_and_relative_positions():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # one position, d = 4: pairs (0, 2) and (1, 3)
    y = apply_rotary(x, start=3)  # angles 3·θ with θ = (1, 1/100)
    assert torch.allclose(y, torch.tensor([[torch.cos(torch.tensor(3.0)), 0.0, torch.sin(torch.tensor(3.0)), 0.0]]))
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    gen = torch.Generator().manual_seed(0)  # unseeded draws made the 'offset matters' check flaky
    q, k = (torch.randn(1, 32, dtype=torch.float64, generator=gen) for _ in range(2))
    dots = [(apply_rotary(q, i) * apply_rotary(k, j)).sum() for i, j in ((5, 2), (105, 102), (3, 0))]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-5)  # only i − j matters
    assert not torch.allclose((apply_rotary(q, 4) * apply_rotary(k, 2)).sum(), dots[0])


def test_favor_estimator_is_unbiased_for_rotary_softmax_scores():
    d, draws, i, j = 8, 3000, 7, 2
    g = torch.Generator().manual_seed(0)
    q = 0.9 * torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=-1)
    k = q.clone()  # aligned: rotating them apart by i − j = 5 changes the score clearly
    rq, rk = apply_rotary(q[None], i)[0], apply_rotary(k[None], j)[0]
    exact = torch.exp(rq @ rk)
    est = []
    for s in range(draws):
        P = gaussian_projection(d, d, orthogonal=True, generator=torch.Generator().manual_seed(s + 1)).double()
        est.append(positive_random_features(rq, P) @ positive_random_features(rk, P))
    est = torch.stack(est)
    bound = 4 * est.std() / draws**0.5
    assert abs(est.mean() - exact) < bound
    # the unrotated kernel is a different target: the estimate must not agree with it
    assert abs(est.mean() - torch.exp(q @ k)) > bound


@pytest.mark.parametrize("attention,kernel", [("favor", "softmax"), ("favor", "relu"), ("exact", "softmax")])
def test_step_equals_full_causal_with_rotary(attention, kernel):
    torch.manual_seed(0)
    mod = MultiheadSelfAttention(32, 4, attention=attention, kernel=kernel, num_features=32, causal=True,
                                 rotary=True).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = mod(x)
        state, ys = mod.init_state(2, x.device, x.dtype), []
        for t in range(40):
            y, state = mod.step(x[:, t : t + 1], state)
            ys.append(y)
        no_rot = MultiheadSelfAttention(32, 4, attention=attention, kernel=kernel, num_features=32, causal=True)
        no_rot.load_state_dict(mod.state_dict())
    assert torch.allclose(torch.cat(ys, 1), full, atol=1e-5)
    assert not torch.allclose(no_rot(x), full, atol=1e-3)  # rotary changes the result


def test_exact_rotary_equals_softmax_of_rotated_scores():
    torch.manual_seed(1)
    mod = MultiheadSelfAttention(16, 2, attention="exact", rotary=True).eval()
    x = torch.randn(1, 12, 16)
    qkv = mod.qkv(x).view(1, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = apply_rotary(qkv[0]), apply_rotary(qkv[1]), qkv[2]
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    ref = mod.out(ref.transpose(1, 2).reshape(1, 12, 16))
    assert torch.allclose(mod(x), ref, atol=1e-5)


def test_rotary_favor_model_has_no_length_cap():
    cfg = ModelConfig(dim=32, depth=1, heads=2, ff_dim=64, positions="rotary", max_positions=16, num_features=16,
                      kernel="softmax")
    model = PerformerLM(cfg).eval()
    assert residue_limit(cfg) is None
    assert model.embed_positions is None and model.position_scale is None
    with torch.no_grad():
        out = model(torch.randint(5, 25, (1, 3000)))["logits"]
    assert out.shape == (1, 3000, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_generation_steps_equal_full_forward_for_a_rotary_clm(attention):
    from proteinperformer.inference.generate import init_states, step_logits

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, positions="rotary", attention=attention,
                      kernel="softmax", num_features=32, causal=True)
    model = PerformerLM(cfg).eval()
    tokens = torch.randint(5, 25, (2, 25))
    with torch.no_grad():
        full = model(tokens)["logits"]
        states, steps = init_states(model, 2), []
        for t in range(tokens.shape[1]):
            logits, states = step_logits(model, tokens[:, t], t, states)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)


def test_queries_and_keys_share_one_rotary_table_pair_for_backward():
    """Packed documents rotate by per-token positions, so the cos/sin tables are (T, d) like a head's q: a layer
    keeps one pair for backward (shared by q and k), not one pair each."""
    attn = MultiheadSelfAttention(32, 2, attention="exact", rotary=True)
    x = torch.randn(1, 40, 32, requires_grad=True)
    positions = torch.cat([torch.arange(25), torch.arange(15)])  # two documents
    tables = set()

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.shape == (40, 16):
            tables.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        q, k, _ = attn.split_heads(x, positions=positions)
    assert len(tables) == 2
    alone = attn.split_heads(x[:, 25:], start=0)
    assert torch.allclose(q[:, :, 25:], alone[0]) and torch.allclose(k[:, :, 25:], alone[1])
