"""Calibrate FAVOR++ features: A and Ψ per layer × head from the queries and keys of the exact model.

The optimal A of OPRF and the rescaling Ψ (``attention/oprf.py``) depend on the statistics of the queries and keys a
layer sees. :func:`calibrate_features` runs the model with exact softmax attention on calibration sequences (teacher
forcing: every layer gets the input the exact model gives it, so the statistics do not depend on the approximation
in earlier layers), sums the pair moments of each layer's q and k (padding excluded; causal models count the pairs
j ≤ i within each sequence) and stores them, with the A and Ψ they give, as the layers' buffers. They are then
frozen: a calibrated checkpoint uses them in every command, and a causal model never sees statistics of the
sequence it predicts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from proteinperformer.attention.oprf import pair_moment_sums
from proteinperformer.model.performer import PerformerLM


@torch.no_grad()
def calibrate_features(model: PerformerLM, batches: Iterable[torch.Tensor]) -> None:
    """Set every layer's FAVOR++ statistics (A, Ψ) from the exact model's queries and keys on ``batches``.

    Args:
        model: a PerformerLM whose config has ``features`` "oprf", "oprf-rescaled" or "oprf-dense" (see
            ``convert_attention``).
        batches: LongTensor token batches [B, T] (``<pad>`` = the alphabet's padding id, masked out).
    Raises ValueError for a model without attention layers, one with ``features="favor+"`` (nothing to calibrate),
    or batches without a single token.
    """
    layers = [block.attn for block in model.layers]
    if not layers:
        raise ValueError("the model has no attention layers to calibrate (depth 0)")
    if model.config.features == "favor+":
        raise ValueError("features='favor+' has nothing to calibrate; convert the model to FAVOR++ features "
                         "('oprf', 'oprf-rescaled' or 'oprf-dense') first (convert_attention(model, features=...))")
    sums: list[torch.Tensor | None] = [None] * len(layers)
    pairs = torch.zeros(len(layers), dtype=torch.float64)

    def collect(i: int):
        def hook(attn, args):
            x, mask = args[0], args[1] if len(args) > 1 else None
            q, k, _ = attn.split_heads(x)
            s, n = pair_moment_sums(q, k, attn.causal, mask, dense=attn.features == "oprf-dense")
            s = s.cpu().double()  # float64 across batches
            sums[i] = s if sums[i] is None else sums[i] + s
            pairs[i] += float(n)
        return hook

    kinds = [attn.attention for attn in layers]
    hooks = [attn.register_forward_pre_hook(collect(i)) for i, attn in enumerate(layers)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for attn in layers:
            attn.attention = "exact"  # teacher forcing: every layer's input as the exact model computes it
        for tokens in batches:
            model(tokens.to(device))
    finally:
        for attn, kind in zip(layers, kinds, strict=True):
            attn.attention = kind
        for h in hooks:
            h.remove()
        model.train(was_training)
    if pairs[0] == 0:
        raise ValueError("no token to calibrate on: the calibration batches are empty")
    for attn, s, n in zip(layers, sums, pairs, strict=True):
        attn.set_feature_moments((s / n).to(attn.feature_moments.dtype), n)


def is_calibrated(model: PerformerLM) -> bool:
    """True if every attention layer holds FAVOR++ statistics from at least one query–key pair."""
    return bool(model.layers) and all(
        getattr(block.attn, "feature_pairs", None) is not None and float(block.attn.feature_pairs) > 0
        for block in model.layers
    )
