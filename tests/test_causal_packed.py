"""Causal FAVOR+ on packed documents (cu_seqlens): the state, the ε-floor sums and the running key stabiliser restart
at every document start, chunk-aligned or not, so each document gets what it gets alone, forward and backward."""

import pytest
import torch

from proteinperformer.attention import gaussian_projection
from proteinperformer.attention.causal import _favor_causal
from proteinperformer.attention.features import feature_map
from proteinperformer.attention.reference import favor_reference

# 70 positions in chunks of 8 and groups of 16: documents start inside chunks (3, 21, 45), on a chunk and group
# boundary (32), twice at one place (an empty document at 45) and one spans several groups
OFFSETS = [0, 3, 21, 32, 45, 45, 70]


def _packed_and_alone(kernel, dtype, offsets, chunk, group, mask=None):
    g = torch.Generator().manual_seed(3)
    L, H, d = offsets[-1], 2, 8
    q, k, v = (2 * torch.randn(1, H, L, d, generator=g, dtype=dtype) for _ in range(3))
    k[:, :, 21] += 6.0  # a key with a large logit right at a document start: it must not set the stabiliser before it
    P = gaussian_projection(16, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    cu = torch.tensor(offsets, dtype=torch.int32)
    w = torch.linspace(-1, 1, L * H * d, dtype=dtype).view(1, H, L, d)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    packed = _favor_causal(*leaves, P, feature_map(kernel), mask, chunk, group, cu_seqlens=cu)
    (packed * w).sum().backward()
    alone_out, alone_grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        if a == b:
            continue
        doc = [t[:, :, a:b].clone().requires_grad_() for t in (q, k, v)]
        m = None if mask is None else mask[:, a:b]
        out = favor_reference(*doc, P, kernel=kernel, causal=True, key_padding_mask=m)
        (out * w[:, :, a:b]).sum().backward()
        alone_out.append(out)
        for full, t in zip(alone_grads, doc, strict=True):
            full[:, :, a:b] = t.grad
    return packed, torch.cat(alone_out, 2), [t.grad for t in leaves], alone_grads


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("chunk,group", [(8, 16), (5, 15), (64, 512)])
def test_packed_equals_each_document_alone_float64(kernel, chunk, group):
    packed, alone, grads, alone_grads = _packed_and_alone(kernel, torch.float64, OFFSETS, chunk, group)
    assert torch.allclose(packed, alone, atol=1e-10), (packed - alone).abs().max()
    for a, b in zip(grads, alone_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()


def test_packed_float32_and_padding():
    """fp32 within 1e-5 of the float64 definition per document, with padded keys inside documents too."""
    mask = torch.zeros(1, 70, dtype=torch.bool)
    mask[0, 30:32] = mask[0, 60:] = True  # the end of one document, the end of the last
    packed, alone, grads, alone_grads = _packed_and_alone("softmax", torch.float32, OFFSETS, 8, 16, mask)
    real = ~mask[0]
    assert (packed[:, :, real] - alone[:, :, real]).abs().max() <= 1e-5
    for a, b in zip(grads, alone_grads, strict=True):
        assert (a[:, :, real] - b[:, :, real]).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


def test_one_document_changes_no_other():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    P = gaussian_projection(16, 8, generator=g)
    cu = torch.tensor([0, 13, 27, 40], dtype=torch.int32)
    out = _favor_causal(q, k, v, P, feature_map("softmax"), None, 8, 16, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 13:27] *= 3.0
    v2[:, :, 13:27] = 100.0
    out2 = _favor_causal(q, k2, v2, P, feature_map("softmax"), None, 8, 16, cu_seqlens=cu)
    assert torch.equal(out[:, :, :13], out2[:, :, :13]) and torch.allclose(out[:, :, 27:], out2[:, :, 27:], atol=1e-6)
    assert (out[:, :, 13:27] - out2[:, :, 13:27]).abs().max() > 1.0


def test_packed_needs_one_row_of_integer_offsets():
    q = torch.randn(2, 2, 10, 8)
    P = gaussian_projection(16, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _favor_causal(q, q, q, P, feature_map("softmax"), None, 8, 16, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        _favor_causal(q[:1], q[:1], q[:1], P, feature_map("softmax"), None, 8, 16,
                      cu_seqlens=torch.tensor([0.0, 10.0]))
