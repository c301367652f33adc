"""What swapping exact attention for FAVOR+ costs a trained Transformer, measured on your own sequences
(``pp-convert --report``; the conversion itself is :func:`proteinperformer.model.convert_attention`).

:func:`report` runs the exact model and its FAVOR+ conversion on the sequences and prints, per layer, the
relative error ‖y_favor − y_exact‖ / ‖y_exact‖ of the attention output (both given the exact model's input to
that layer, residue and special tokens of every sequence), and the masked-residue accuracy / perplexity of
both models (15% of residues replaced by ``<mask>``, fixed seed; for a causal model such as an imported GPT-2,
the next-residue accuracy / perplexity instead), over ``--draws`` projection draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from proteinperformer.checkpoints import load_model
from proteinperformer.inference.embed import as_records, residue_limit
from proteinperformer.model import PerformerLM, convert_attention

DEFAULT_NUM_FEATURES = 256  # see docs/esm2.md "Which defaults, and why" (measured in studies/fig5_small/)


@torch.no_grad()
def attention_errors(exact: PerformerLM, favor: PerformerLM, tokens: torch.Tensor) -> list[float]:
    """Per layer: squared error and squared norm sums of FAVOR+ vs exact attention output on exact's inputs."""
    inputs: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_hook(lambda _m, args, _o: inputs.append(args[0])) for b in exact.layers]
    try:
        exact(tokens)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for x, e_block, f_block in zip(inputs, exact.layers, favor.layers, strict=True):
        ye, yf = e_block.attn(x).double(), f_block.attn(x).double()
        out.append((float((yf - ye).pow(2).sum()), float(ye.pow(2).sum())))
    return out


@torch.no_grad()
def masked_scores(model: PerformerLM, tokens: torch.Tensor, masked: torch.Tensor) -> tuple[int, float]:
    """(correct predictions, summed NLL) at the ``masked`` positions of ``tokens`` (which hold <mask> there)."""
    logits = model(tokens)["logits"].float()
    target = masked["target"]
    logp = torch.log_softmax(logits[masked["where"]], -1)
    nll = -logp.gather(1, target[:, None]).sum().item()
    return int((logp.argmax(-1) == target).sum()), nll


def mask_residues(tokens: torch.Tensor, alphabet, rate: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Replace ``rate`` of the residues (at least one) by <mask>: (masked tokens, {"where", "target"})."""
    g = torch.Generator().manual_seed(seed)
    residue = alphabet.is_residue(tokens)
    pick = residue & (torch.rand(tokens.shape, generator=g) < rate)
    if not pick.any():
        pick[0, 1] = True
    masked = tokens.masked_fill(pick, alphabet.mask_idx)
    return masked, {"where": pick, "target": tokens[pick]}


def next_residue_targets(tokens: torch.Tensor, alphabet) -> dict:
    """Causal models: {"where": positions whose next token is a residue, "target": that residue}."""
    where = torch.zeros_like(tokens, dtype=torch.bool)
    where[:, :-1] = alphabet.is_residue(tokens[:, 1:])
    return {"where": where, "target": tokens[:, 1:][where[:, :-1]]}


def report(source: str | Path, fasta: str | Path, num_features: int = DEFAULT_NUM_FEATURES, kernel: str | None = None,
           draws: int = 3, max_sequences: int = 200, max_residues: int = 1022,
           device: str | torch.device = "cpu") -> dict:
    """What FAVOR+ changes on the sequences of ``fasta``: per-layer attention error and exact vs FAVOR+ MLM.

    Sequences are cropped to ``max_residues`` or the exact model's limit; the models run on ``device``. ``kernel``
    None keeps the source's own. Returns a dict (see ``pp-convert``).
    """
    exact = load_model(source, device, attention="exact")
    kernel = kernel or exact.config.kernel  # the source's own kernel unless one is asked for
    max_residues = min(max_residues, residue_limit(exact.config) or max_residues)
    records = [(label, seq[:max_residues]) for label, seq in as_records(fasta)[:max_sequences]]
    converter = exact.alphabet.get_batch_converter()
    batches = [converter([r])[2] for r in records]  # one sequence per pass: no padding in the comparison
    causal = exact.config.causal
    masks = [(t, next_residue_targets(t, exact.alphabet)) if causal else mask_residues(t, exact.alphabet, seed=i)
             for i, t in enumerate(batches)]  # drawn on the CPU
    batches = [t.to(device) for t in batches]
    masks = [(m.to(device), {k: v.to(device) for k, v in where.items()}) for m, where in masks]
    depth = exact.config.depth
    err = torch.zeros(draws, depth, 2, dtype=torch.float64)
    scores = {"exact": [0, 0.0], "favor": [0, 0.0]}
    n_masked = sum(int(m["where"].sum()) for _, m in masks)
    for masked, where in masks:
        c, nll = masked_scores(exact, masked, where)
        scores["exact"][0] += c
        scores["exact"][1] += nll
    favor_scores = []
    for d in range(draws):
        favor = convert_attention(exact, "favor", num_features, kernel, seed=d).eval()
        correct, nll = 0, 0.0
        for tokens, (masked, where) in zip(batches, masks, strict=True):
            err[d] += torch.tensor(attention_errors(exact, favor, tokens), dtype=torch.float64)
            c, n = masked_scores(favor, masked, where)
            correct, nll = correct + c, nll + n
        favor_scores.append((correct / n_masked, math.exp(nll / n_masked)))
    rel = (err[..., 0] / err[..., 1]).sqrt()  # [draws, depth]
    return {
        "source": str(source), "fasta": str(fasta), "sequences": len(records), "masked_residues": n_masked,
        "num_features": num_features, "kernel": kernel, "draws": draws,
        "objective": "next-residue" if causal else "masked-residue",
        "layer_rel_error_mean": rel.mean(0).tolist(), "layer_rel_error_std": rel.std(0).tolist() if draws > 1
        else [0.0] * depth,
        "exact_acc": scores["exact"][0] / n_masked, "exact_ppl": math.exp(scores["exact"][1] / n_masked),
        "favor_acc": sum(a for a, _ in favor_scores) / draws, "favor_ppl": sum(p for _, p in favor_scores) / draws,
        "favor_acc_per_draw": [a for a, _ in favor_scores], "favor_ppl_per_draw": [p for _, p in favor_scores],
    }


def print_report(r: dict) -> None:
    print(f"{r['source']}: FAVOR+ ({r['kernel']} kernel, {r['num_features']} features, {r['draws']} draws) vs "
          f"exact attention on {r['sequences']} sequences of {r['fasta']}")
    print("layer  relative error of the attention output (mean ± std over draws)")
    for i, (m, s) in enumerate(zip(r["layer_rel_error_mean"], r["layer_rel_error_std"], strict=True), start=1):
        print(f"{i:>5}  {m:.4f} ± {s:.4f}")
    what = r.get("objective", "masked-residue")
    print(f"{what} accuracy  exact {100 * r['exact_acc']:.2f}%   "
          f"FAVOR+ {100 * r['favor_acc']:.2f}%")
    print(f"perplexity               exact {r['exact_ppl']:.3f}   FAVOR+ {r['favor_ppl']:.3f}   "
          f"({r['masked_residues']} {'scored' if what == 'next-residue' else 'masked'} residues)")
