"""What swapping exact attention for FAVOR+ costs a trained Transformer, measured on your own sequences
(``pp-convert --report``; the conversion itself is :func:`proteinperformer.model.convert_attention`).

:func:`report` runs the exact model and its FAVOR+ conversion on the sequences and measures, per layer, the
relative error ‖y_favor − y_exact‖ / ‖y_exact‖ of the attention output (both given the exact model's input to
that layer, residue and special tokens of every sequence), and the masked-residue accuracy / perplexity of
both models, over ``--draws`` projection draws: :func:`~proteinperformer.training.scoring.score_batches` on the
evaluation targets of :func:`~proteinperformer.training.scoring.evaluation_collator` (15% of residues replaced by
``<mask>``, as training validates, seeded by the sequence's index; for a causal model such as an imported GPT-2,
every next residue instead). ``pp-convert`` prints the report (:mod:`proteinperformer.cli.convert`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from proteinperformer.checkpoints import load_model
from proteinperformer.data.fasta import read_fasta
from proteinperformer.inference.embed import as_records, residue_limit
from proteinperformer.model import PerformerLM, calibrate_features, convert_attention
from proteinperformer.model.performer import own_kernel
from proteinperformer.options import DEFAULT_NUM_FEATURES
from proteinperformer.training.scoring import evaluation_collator, score_batches

CALIBRATION_BATCH = 8  # sequences per forward pass of the calibration (length-sorted, padding masked)


def calibrate_on_fasta(model: PerformerLM, fasta: str | Path, max_sequences: int = 200,
                       device: str | torch.device = "cpu") -> int:
    """:func:`~proteinperformer.model.calibrate_features` on the first ``max_sequences`` sequences of ``fasta``.

    Sequences are read with the model's alphabet (tagged vocabularies such as IgLM's take their tags in the
    sequence, ``[HEAVY][HUMAN]EVQ...``), framed as the model's batch converter frames them and cropped to the
    model's length limit. Returns the number of sequences used. ValueError naming the file (and line) for letters
    the alphabet lacks or a file without sequences.
    """
    records = []
    for record in read_fasta(fasta, model.alphabet):
        if len(records) == max_sequences:
            break
        records.append((record.id, record.sequence))
    if not records:
        raise ValueError(f"{fasta}: no sequences to calibrate on; give a FASTA of sequences like those the model "
                         "will see")
    limit = residue_limit(model.config)
    converter = model.alphabet.get_batch_converter(None if limit is None else limit + 2)
    records.sort(key=lambda r: len(r[1]))
    batches = [converter(records[i : i + CALIBRATION_BATCH])[2] for i in range(0, len(records), CALIBRATION_BATCH)]
    model.to(device)
    calibrate_features(model, batches)
    return len(records)


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


def report(source: str | Path, fasta: str | Path, num_features: int = DEFAULT_NUM_FEATURES, kernel: str | None = None,
           draws: int = 3, max_sequences: int = 200, max_residues: int = 1022,
           device: str | torch.device = "cpu", features: str | None = None,
           calibrate: str | Path | None = None) -> dict:
    """What FAVOR+ changes on the sequences of ``fasta``: per-layer attention error and exact vs FAVOR+ MLM.

    Sequences are cropped to ``max_residues`` or the exact model's limit; the models run on ``device``. ``kernel``
    None keeps the source's own. ``features`` other than "favor+" (FAVOR++) calibrates each draw on the first
    ``max_sequences`` sequences of ``calibrate`` (:func:`calibrate_on_fasta`). Returns a dict (see ``pp-convert``).
    """
    exact = load_model(source, device)
    kernel = kernel or own_kernel(exact.config)  # the source's own kernel (softmax if exact) unless one is asked for
    exact = convert_attention(exact, "exact") if exact.config.attention != "exact" else exact
    max_residues = min(max_residues, residue_limit(exact.config) or max_residues)
    records = [(label, seq[:max_residues]) for label, seq in as_records(fasta)[:max_sequences]]
    converter = exact.alphabet.get_batch_converter()
    tokens = [converter([r])[2] for r in records]  # one sequence per pass: no padding in the comparison
    causal = exact.config.causal
    collate = evaluation_collator(exact.alphabet, causal)
    batches = [collate([{"tokens": t[0], "seed": i}]) for i, t in enumerate(tokens)]  # masks drawn on the CPU
    tokens = [t.to(device) for t in tokens]
    exact_scores = score_batches(exact, batches, exact.alphabet)
    if exact_scores["residues"] == 0:
        raise ValueError(f"{fasta}: no residue was {'scored' if causal else 'masked'} in {len(records)} sequences; "
                         "give more or longer sequences")
    depth = exact.config.depth
    err = torch.zeros(draws, depth, 2, dtype=torch.float64)
    favor_scores = []
    for d in range(draws):
        favor = convert_attention(exact, "favor", num_features, kernel, seed=d, features=features).eval()
        if favor.config.features != "favor+":
            calibrate_on_fasta(favor, calibrate, max_sequences, device)
        for t in tokens:
            err[d] += torch.tensor(attention_errors(exact, favor, t), dtype=torch.float64)
        scores = score_batches(favor, batches, exact.alphabet)
        favor_scores.append((scores["accuracy"], scores["perplexity"]))
    rel = (err[..., 0] / err[..., 1]).sqrt()  # [draws, depth]
    return {
        "source": str(source), "fasta": str(fasta), "sequences": len(records),
        "masked_residues": exact_scores["residues"], "num_features": num_features, "kernel": kernel, "draws": draws,
        "features": features or "favor+", "calibration": None if calibrate is None else str(calibrate),
        "objective": "next-residue" if causal else "masked-residue",
        "layer_rel_error_mean": rel.mean(0).tolist(), "layer_rel_error_std": rel.std(0).tolist() if draws > 1
        else [0.0] * depth,
        "exact_acc": exact_scores["accuracy"], "exact_ppl": exact_scores["perplexity"],
        "favor_acc": sum(a for a, _ in favor_scores) / draws, "favor_ppl": sum(p for _, p in favor_scores) / draws,
        "favor_acc_per_draw": [a for a, _ in favor_scores], "favor_ppl_per_draw": [p for _, p in favor_scores],
    }
