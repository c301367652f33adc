"""Attention transfer: train only the FAVOR feature parameters so that each layer mimics its exact softmax attention.

A pretrained Transformer converted to FAVOR+ keeps its weights, but trained queries and keys are long and their
attention sharp, where positive random features have exponentially large variance: the attention output is then
wrong by about its own size (studies/fig5_iglm). Hedgehog (Zhang et al., ICLR 2024) and LoLCATs (Zhang et al.
2024) fit the feature map instead: with every other weight frozen, each layer's feature parameters are trained to
reproduce that layer's exact attention output, given the exact model's input to the layer (teacher forcing).
Layers are then independent, so they are trained one after another from one exact forward pass.

What is trained (``MultiheadSelfAttention(transferred=True)``): for the positive random features of FAVOR+
(kernel "softmax"), a per-head rescaling Ψ and projection W applied before the map, so head h's features are
φ(P·W_h·Ψ_h q) and φ(P·W_h·Ψ_h⁻¹ k) (Ψ starts at the calibrated SADERF value (Σ k_l² / Σ q_l²)^(1/4), W at the
identity: the start is FAVOR+ with rescaled inputs); for Hedgehog's map (kernel "hedgehog"), its per-head
projection. Loss: ‖y − y_exact‖² / ‖y_exact‖² of the layer's output (after the output projection) over the real
tokens of a batch of calibration sequences (one batch of about ``DEFAULT_BATCH_TOKENS`` per step, cycling), Adam
with a cosine-decayed learning rate. The loss runs through the same FAVOR path the model runs with (what is trained
is what runs).

The data are the given sequences plus ``DEFAULT_AUGMENT`` copies of each with 10% of the residues replaced at random
(:func:`mutated_copies`): the targets stay the exact model's attention on those inputs, and with few sequences
(15 IgLM chains) the fit otherwise learns them rather than the model. Steps per layer default to the same budget of
work for every model (:func:`default_steps`). On request
(``pp-convert --distill-steps``), :func:`distill_features` then trains the same parameters of all layers at once
against the exact model's output distributions (KL). Measured on IgLM with 15 calibration chains it lowers the KL on
those chains but not on held-out ones (it overfits), so it is off by default; the remaining gap is at the conserved
end of the chain (FR4 and [SEP], after the variable-length CDR3), where the exact model attends to the last few
residues and linear attention spreads that mass over the whole prefix.

Plain torch: :func:`transfer_attention` takes the exact model, the model to train (built by
:func:`transfer_model`) and token batches; ``pp-convert --transfer FASTA`` reads the sequences and writes the
checkpoint (:mod:`proteinperformer.cli.convert`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from proteinperformer.attention import MultiheadSelfAttention
from proteinperformer.files import write_atomic
from proteinperformer.model.calibration import calibrate_features
from proteinperformer.model.performer import PerformerLM, convert_attention
from proteinperformer.options import TRANSFER_BUDGET, TRANSFER_STEP_OFFSET, TRANSFER_STEP_RANGE
from proteinperformer.tokenizer import STANDARD_RESIDUES, Alphabet

DEFAULT_LR = 1e-2
DEFAULT_DISTILL_LR = 3e-3  # distill_features: all layers at once, a smaller step
DEFAULT_BATCH_TOKENS = 512  # padded tokens per step (about 4 antibody chains): the cost of a step
DEFAULT_KERNEL = "softmax"  # FAVOR+ features with a trained W and Ψ; "hedgehog" is the alternative (measured)
DEFAULT_FEATURES = "favor+"  # the softmax kernel's start: FAVOR+ with SADERF's Ψ ("oprf-rescaled": calibrated FAVOR++)
DEFAULT_WINDOW = 16  # pp-convert --transfer on a causal softmax-kernel model: exact attention over the last 16 keys
# (attention/window.py). Measured on IgLM-S / the 13M IgLM (docs/gpt2_iglm.md, 3 draws): 81.17% / 80.23% against
# exact 81.12% / 80.18% (without it 80.01% / 79.84%), samples judged like exact IgLM's own (1.01x; without 1.9-2.2x)
DEFAULT_AUGMENT = 3  # mutated copies of each calibration sequence (mutated_copies) added to the transfer's data:
# with 15 IgLM chains the transfer is limited by data (last-layer error 0.32 on them, 0.50 held out); three copies
# with 10% of residues replaced raise held-out accuracy ~0.3 point on IgLM-S and the 13M IgLM (3 draws each,
# docs/gpt2_iglm.md) for ~10% more CPU (the exact model's passes over 4x the tokens; the steps stay the same)


@dataclass
class LayerResult:
    """One layer's transfer: the relative error ‖y − y_exact‖ / ‖y_exact‖ of its attention output on the
    calibration tokens before and after, and the CPU-seconds it took (``resumed``: read back from a stopped run)."""

    layer: int
    error_before: float
    error_after: float
    seconds: float
    resumed: bool = False


def default_steps(depth: int, width: int, num_features: int) -> int:
    """Adam steps per layer when none are given: the same budget of work for every model (``options.TRANSFER_BUDGET``
    / (depth × width × (m + 128)), rounded to tens, in ``TRANSFER_STEP_RANGE``), since a step costs about
    width × (m + 128): 500 for IgLM-S (3 × 192) at m = 256, 140 for the 13M IgLM (4 × 512), 1,000 for IgLM-S at
    m = 64."""
    steps = 10 * round(TRANSFER_BUDGET / (depth * width * (num_features + TRANSFER_STEP_OFFSET)) / 10)
    return min(max(steps, TRANSFER_STEP_RANGE[0]), TRANSFER_STEP_RANGE[1])


def default_distill_steps(steps: int) -> int:
    """Steps of :func:`distill_features` that ``pp-convert --distill-steps`` suggests for ``steps`` per layer: a fifth
    as many (one costs about one step of every layer, so the stage adds about a quarter to the layer-by-layer cost).
    Not run by default: on 15 IgLM chains it overfits (studies/fig5_iglm/README.md)."""
    return max(steps // 5, 1)


class TransferError(ValueError):
    """A model or input that attention transfer cannot use; the message says what to do."""


def transfer_model(exact: PerformerLM, num_features: int, kernel: str = DEFAULT_KERNEL, seed: int = 0,
                   features: str = "favor+", window: int = 0) -> PerformerLM:
    """``exact``'s network with FAVOR attention whose feature parameters can be trained (``config.transferred``):
    every other weight is copied, the projections are drawn from ``seed``; ``features`` other than "favor+"
    (FAVOR++) are calibrated by :func:`transfer_attention` before it trains. ``window`` > 0: the sliding-window
    hybrid (``attention/window.py``) is in place while the features train (LoLCATs), and stays in the model."""
    if exact.config.depth == 0:
        raise TransferError("the model has no attention layers to transfer")
    if exact.config.transferred:
        raise TransferError("the model is already transferred; transfer the original (exact) model instead")
    draw = convert_attention(exact, "favor", num_features, kernel, seed=seed, features=features,
                             window=window)  # pp-convert's
    return _with_trainable_features(draw, seed)


def _with_trainable_features(model: PerformerLM, seed: int) -> PerformerLM:
    """The same model with ``transferred=True`` (the trained parameters at their start: Ψ = 1, W = I)."""
    cfg = replace(model.config, transferred=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = PerformerLM(cfg)
    state = new.state_dict()
    state.update(model.state_dict())  # the source's weights and draw; the trained parameters keep their start
    new.load_state_dict(state, strict=True)
    return new.to(next(model.parameters()).device).eval()


def calibration_batches(alphabet: Alphabet, records: Sequence[tuple[str, str]], cls: bool = True,
                        max_len: int | None = None, max_tokens: int = DEFAULT_BATCH_TOKENS,
                        device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, L), padding mask (B, L)) batches of ``<cls> residues <eos>`` rows (``cls=False``: without
    ``<cls>``, the framing of GPT-2 models such as IgLM), cropped to ``max_len`` tokens, sorted by length and
    packed to about ``max_tokens`` padded tokens each. Raises TransferError for no records."""
    if not records:
        raise TransferError("no sequences to transfer on; give a FASTA file with at least one record")
    converter = alphabet.get_batch_converter(max_len)
    rows = [converter([r])[2][0, 0 if cls else 1 :] for r in records]
    rows.sort(key=len)
    batches, start = [], 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and (end + 1 - start) * len(rows[end]) <= max_tokens:
            end += 1
        tokens = torch.nn.utils.rnn.pad_sequence(rows[start:end], batch_first=True,
                                                 padding_value=alphabet.padding_idx)
        batches.append((tokens.to(device), (tokens == alphabet.padding_idx).to(device)))
        start = end
    return batches


def mutated_copies(records: Sequence[tuple[str, str]], copies: int, rate: float = 0.1, seed: int = 0,
                   ) -> list[tuple[str, str]]:
    """``records`` followed by ``copies`` copies of each in which every residue (an upper-case letter outside
    ``[...]`` / ``<...>`` tags) is replaced, with probability ``rate``, by one of the 20 amino acids drawn uniformly:
    more inputs on which the exact model's attention is the target, so that 15 chains fit less to themselves."""
    rng = random.Random(seed)
    out = list(records)
    for c in range(copies):
        for rid, seq in records:
            parts = re.split(r"(\[[^\]]*\]|<[^>]*>)", seq)  # tags at odd indices
            body = [p if i % 2 else "".join(rng.choice(STANDARD_RESIDUES) if a.isupper() and rng.random() < rate else a
                                            for a in p) for i, p in enumerate(parts)]
            out.append((f"{rid}/mutated{c + 1}", "".join(body)))
    return out


def feature_parameters(attn: MultiheadSelfAttention) -> dict[str, torch.nn.Parameter]:
    """The trained parameters of one attention layer: the learned projection, log Ψ and W (whichever it has)."""
    return {name: p for name, p in attn.named_parameters() if name in ("projection", "feature_scale",
                                                                        "feature_weight")}


def layer_inputs(exact: PerformerLM, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 student: PerformerLM | None = None) -> Iterator[list[torch.Tensor]]:
    """Teacher forcing: the input of each attention layer of ``exact`` on every batch, one layer at a time
    ([batch] (B, L, D) per layer), so memory holds one layer's inputs and hidden states, whatever the depth.
    ``student``: the inputs of ``student``'s layers instead, each computed after the caller has trained the layers
    below (the next layer is run only when the caller asks for the next inputs)."""
    source = exact if student is None else student
    with torch.no_grad():
        hidden = [source.embed(tokens, padding) for tokens, padding in batches]
    for block in source.layers:
        with torch.no_grad():
            inputs = [block.norm1(h) for h in hidden]
        yield inputs
        with torch.no_grad():
            hidden = [block(h, padding) for h, (_, padding) in zip(hidden, batches, strict=True)]


def residual_inputs(exact: PerformerLM, student: PerformerLM, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per layer: ``student``'s attention inputs (after the caller trained the layers below) and the attention output
    that would bring the student's residual stream back onto the exact model's, attn_exact(x_exact) + h_exact −
    h_student ([batch] (B, L, D) each)."""
    with torch.no_grad():
        he = [exact.embed(tokens, padding) for tokens, padding in batches]
        hs = [h.clone() for h in he]
    for e_block, s_block in zip(exact.layers, student.layers, strict=True):
        with torch.no_grad():
            xs = [s_block.norm1(h) for h in hs]
            ys = [e_block.attn(e_block.norm1(a), padding) + a - b
                  for a, b, (_, padding) in zip(he, hs, batches, strict=True)]
        yield xs, ys
        with torch.no_grad():
            he = [e_block(h, padding) for h, (_, padding) in zip(he, batches, strict=True)]
            hs = [s_block(h, padding) for h, (_, padding) in zip(hs, batches, strict=True)]


@dataclass
class _Targets:
    """A layer's fixed data on one batch: its split heads q, k, v (B, H, L, d), the exact output (B, L, D), the exact
    heads' outputs before the output projection (B, H, L, d), the key padding mask (B, L) and the real tokens'
    weights (B, L, 1)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    y: torch.Tensor
    padding: torch.Tensor
    real: torch.Tensor
    heads: torch.Tensor | None = None


@torch.no_grad()
def _targets(exact_attn: MultiheadSelfAttention, xs: list[torch.Tensor], paddings: list[torch.Tensor],
             ys: list[torch.Tensor] | None = None, heads: bool = False) -> list[_Targets]:
    """``heads``: also the exact heads' outputs (only ``loss="heads"`` reads them: one more exact attention)."""
    from proteinperformer.attention.exact import exact_attention

    out = []
    for i, (x, padding) in enumerate(zip(xs, paddings, strict=True)):
        q, k, v = exact_attn.split_heads(x)
        per_head = exact_attention(q, k, v, causal=exact_attn.causal, key_padding_mask=padding) if heads else None
        y = exact_attn(x, padding) if ys is None else ys[i]
        out.append(_Targets(q, k, v, y, padding, (~padding).unsqueeze(-1).to(x.dtype), per_head))
    return out


def _relative_error(attn: MultiheadSelfAttention, data: list[_Targets], loss: str = "output") -> torch.Tensor:
    """‖y − y_exact‖² / ‖y_exact‖² over the real tokens of every batch (a 0-d tensor with gradient); ``loss="heads"``:
    the mean over heads of each head's relative error before the output projection."""
    err = norm = 0.0
    for t in data:
        y = attn.favor(t.q, t.k, t.v, key_padding_mask=t.padding)
        if loss == "heads":
            real = t.real.unsqueeze(1)  # (B, 1, L, 1)
            err = err + ((y - t.heads).pow(2) * real).sum((0, 2, 3))
            norm = norm + (t.heads.pow(2) * real).sum((0, 2, 3))
            continue
        y = attn._merge(y)
        err = err + ((y - t.y).pow(2) * t.real).sum()
        norm = norm + (t.y.pow(2) * t.real).sum()
    return (err / norm).mean()


@torch.no_grad()
def calibrate_scale(attn: MultiheadSelfAttention, data: list[_Targets]) -> None:
    """SADERF's per-dimension rescaling as the start of Ψ: log Ψ_l = ¼ log(Σ k_l² / Σ q_l²) per head, over the real
    tokens (it leaves every qᵀk unchanged and balances the norms the features see)."""
    if attn.feature_scale is None or attn.features != "favor+":  # FAVOR++ has its own calibrated Ψ
        return
    q2 = sum((t.q.pow(2) * t.real.unsqueeze(1)).sum((0, 2)) for t in data)  # (H, d)
    k2 = sum((t.k.pow(2) * t.real.unsqueeze(1)).sum((0, 2)) for t in data)
    attn.feature_scale.copy_(0.25 * (k2.clamp_min(1e-12) / q2.clamp_min(1e-12)).log())


def _schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor at step s: linear warm-up over the first ``warmup`` share of ``steps``, then cosine
    decay to 0."""
    rise = int(warmup * steps)

    def factor(s: int) -> float:
        if s < rise:
            return (s + 1) / rise
        return 0.5 * (1 + math.cos(math.pi * (s - rise) / max(steps - rise, 1)))

    return factor


def transfer_layer(attn: MultiheadSelfAttention, data: list[_Targets], steps: int, lr: float,
                   progress: Callable[..., Iterable] | None = None, label: str = "", warmup: float = 0.0,
                   loss: str = "output", train: Sequence[str] | None = None, decay: float = 0.0,
                   ) -> tuple[float, float]:
    """Train one layer's feature parameters (Adam, ``lr`` warmed up over the first ``warmup`` share of the steps,
    then cosine-decayed, one batch of ``data`` per step, cycling); (error before, after) on all of ``data``."""
    calibrate_scale(attn, data)
    params = [p for n, p in feature_parameters(attn).items() if train is None or n in train]
    with torch.no_grad():
        before = math.sqrt(float(_relative_error(attn, data)))
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup))
    steps_iter = progress(range(steps), desc=label, leave=False) if progress else range(steps)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    running = before**2
    for step in steps_iter:
        opt.zero_grad(set_to_none=True)
        value = _relative_error(attn, [data[order[step % len(data)]]], loss)  # one batch per step, fixed shuffle
        value.backward()
        opt.step()
        if decay:  # decoupled decay towards the start (AdamW-style)
            with torch.no_grad():
                for p, p0 in zip(params, start, strict=True):
                    p.sub_(sched.get_last_lr()[0] * decay * (p - p0))
        sched.step()
        running = 0.9 * running + 0.1 * float(value.detach())
        if hasattr(steps_iter, "set_postfix_str") and step % 10 == 0:
            steps_iter.set_postfix_str(f"error {before:.3f} -> {math.sqrt(running):.3f}", refresh=False)
    with torch.no_grad():
        after = math.sqrt(float(_relative_error(attn, data)))
    return before, after


def transfer_attention(
    exact: PerformerLM,
    model: PerformerLM,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int | None = None,
    lr: float = DEFAULT_LR,
    resume_dir: str | Path | None = None,
    progress: Callable[..., Iterable] | None = None,
    log: Callable[[str], None] | None = print,
    warmup: float = 0.0,
    loss: str = "output",
    inputs: str = "exact",
    layer_shares: Sequence[float] | None = None,
    train: Sequence[str] | None = None,
    decay: float = 0.0,
) -> list[LayerResult]:
    """Fit ``model``'s feature parameters, layer by layer, to ``exact``'s attention on ``batches`` (in place).

    Args:
        exact: the source model (exact attention), in eval mode.
        model: :func:`transfer_model` of it: the same weights, FAVOR attention with trainable features.
        batches: (tokens (B, L), padding mask (B, L), True = padding) on the models' device.
        steps, lr: Adam steps per layer (one batch each; None: :func:`default_steps` of the model's depth, width
            and number of features) and the starting learning rate (cosine decay to 0).
        resume_dir: each finished layer's parameters and errors are saved here (``layer<i>.pt``, atomic) and read
            back by a later call with the same settings, which then trains only the layers left.
        progress: a tqdm-like wrapper for each layer's steps (``proteinperformer.progress.track``), or None.
        log: where each layer's line ``layer i/n: attention-output relative error a -> b (s)`` goes, or None.
        warmup, loss, inputs, layer_shares, train, decay: the recipe's alternatives, kept for the measured search
            of docs/gpt2_iglm.md (studies/fig5_iglm/transfer_recipes.py); none beat the defaults on IgLM-S.
            ``warmup``: share of the steps with a linear warm-up; ``loss="heads"``: mean per-head relative error
            before the output projection; ``inputs="student"``: each layer fed by the transferred layers below,
            ``"residual"``: the same with the target moved by the gap between the exact and the student residual
            streams; ``layer_shares``: how the depth × ``steps`` are split over the layers; ``train``: the names of
            the parameters trained (default all of :func:`feature_parameters`); ``decay``: decoupled decay of the
            parameters towards their start (per step: lr × decay × (p − p₀)).
    Returns:
        one :class:`LayerResult` per layer. Only the feature parameters of ``model`` change (each layer's
        ``projection`` of a learned map, ``feature_scale``, ``feature_weight``); ``config.transferred`` is True.
    """
    if not model.config.transferred:
        raise TransferError("the model to train has no trainable features; build it with transfer_model()")
    if steps is None:
        cfg = model.config
        steps = default_steps(cfg.depth, cfg.dim, cfg.num_features)
    exact.eval()
    model.eval()  # no dropout; the feature parameters still get gradients
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    folder = None if resume_dir is None else Path(resume_dir)
    key = _fingerprint(exact, model, batches, steps, lr, [warmup, loss, inputs, layer_shares, train, decay])
    depth = len(model.layers)
    shares = [1.0] * depth if layer_shares is None else [float(x) for x in layer_shares]
    per_layer = [max(1, round(steps * depth * x / sum(shares))) for x in shares]
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        settings = folder / "settings.json"
        if not settings.is_file() or json.loads(settings.read_text()).get("key") != key:  # another run's: start over
            for old in folder.glob("layer*.pt"):
                old.unlink()
            write_atomic(settings, lambda tmp: tmp.write_text(json.dumps({"key": key})))
    if model.config.features != "favor+":  # FAVOR++: A and Ψ from these sequences, the start of the training
        calibrate_features(model, [tokens for tokens, _ in batches])
    paddings = [padding for _, padding in batches]
    results = []
    student = model if inputs == "student" else None
    feed = (residual_inputs(exact, model, batches) if inputs == "residual"
            else ((xs, None) for xs in layer_inputs(exact, batches, student)))
    try:
        for i, (e_block, block, (xs, ys)) in enumerate(zip(exact.layers, model.layers, feed, strict=True)):
            params = feature_parameters(block.attn)
            saved = None if folder is None else folder / f"layer{i}.pt"
            if saved is not None and saved.is_file():
                done = torch.load(saved, map_location="cpu", weights_only=True)
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(done["parameters"][name])
                result = LayerResult(i, done["error_before"], done["error_after"], done["seconds"], resumed=True)
            else:
                t0 = time.process_time()
                for p in params.values():
                    p.requires_grad_(True)
                data = _targets(e_block.attn, xs, paddings, ys, heads=loss == "heads")
                before, after = transfer_layer(block.attn, data, per_layer[i], lr, progress, f"layer {i + 1}/{depth}",
                                               warmup, loss, train, decay)
                for p in params.values():
                    p.requires_grad_(False)
                result = LayerResult(i, before, after, time.process_time() - t0)
                if saved is not None:
                    state = {"parameters": {n: p.detach().cpu().clone() for n, p in params.items()}, **asdict(result)}
                    write_atomic(saved, lambda tmp, state=state: torch.save(state, tmp))
            results.append(result)
            if log is not None:
                how = "resumed" if result.resumed else f"{result.seconds:.1f} CPU-s"
                log(f"layer {i + 1}/{depth}: attention-output relative error {result.error_before:.3f} -> "
                    f"{result.error_after:.3f} ({how})")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return results


def distill_features(
    exact: PerformerLM,
    model: PerformerLM,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = DEFAULT_DISTILL_LR,
    progress: Callable[..., Iterable] | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[float, float, float]:
    """After :func:`transfer_attention`: train every layer's feature parameters together so that ``model``'s output
    distributions match ``exact``'s (mean per-token KL(exact ‖ model) over the real tokens that have a next token,
    one batch per step, Adam with a cosine-decayed ``lr``); in place. Layer-by-layer transfer fits each layer on the
    exact model's inputs; this stage corrects what the layers' errors do to each other and to the next-token
    distribution (in IgLM, the end of the chain after the variable-length CDR3). Returns (KL before, KL after on all
    ``batches``, CPU-seconds)."""
    t0 = time.process_time()
    exact.eval()
    model.eval()
    params = [p for block in model.layers for p in feature_parameters(block.attn).values()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    with torch.no_grad():
        targets = [torch.log_softmax(exact(tokens, padding)["logits"].float(), -1) for tokens, padding in batches]
    eos = model.alphabet.eos_idx
    weights = [((~padding) & (tokens != eos)).float() for tokens, padding in batches]

    def kl(i: int) -> torch.Tensor:
        tokens, padding = batches[i]
        lp = torch.log_softmax(model(tokens, padding)["logits"].float(), -1)
        per_token = (targets[i].exp() * (targets[i] - lp)).sum(-1)
        return (per_token * weights[i]).sum() / weights[i].sum().clamp_min(1)

    def mean_kl() -> float:
        with torch.no_grad():
            return sum(float(kl(i)) * float(weights[i].sum()) for i in range(len(batches))) / max(
                sum(float(w.sum()) for w in weights), 1.0)

    try:
        before = mean_kl()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
        steps_iter = progress(range(steps), desc="all layers", leave=False) if progress else range(steps)
        for step in steps_iter:
            opt.zero_grad(set_to_none=True)
            kl(order[step % len(batches)]).backward()
            opt.step()
            sched.step()
        for p in params:
            p.requires_grad_(False)
        after = mean_kl()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    seconds = time.process_time() - t0
    if log is not None:
        log(f"all layers: output KL to the exact model {before:.4f} -> {after:.4f} ({seconds:.1f} CPU-s)")
    return before, after, seconds


def _fingerprint(exact: PerformerLM, model: PerformerLM, batches, steps: int, lr: float, recipe=None) -> str:
    """What a resumed run shares with the one it continues: config, checksums of weights, draw and data, settings."""
    h = hashlib.sha256(json.dumps([model.config.to_dict(), steps, lr] + ([recipe] if recipe else []), sort_keys=True,
                                  default=str).encode())
    for t in [*exact.state_dict().values(), *model.state_dict().values(), *(x for b in batches for x in b)]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
