"""Accuracy and perplexity on residue targets: the paper's masked-LM (and next-residue) metric, one definition.

A batch's targets are its ``labels`` (``IGNORE_INDEX`` elsewhere), as the collators of ``data/collate.py`` make them:
masked residues (:class:`~proteinperformer.data.collate.MLMCollator`; evaluation masks with
``MLMCollator.for_evaluation``, every selected residue replaced by ``<mask>``) or next tokens
(:class:`~proteinperformer.data.collate.CLMCollator`). :func:`batch_sums` is the per-batch sum every caller
accumulates: the NLL of all targets (the training loss; for CLM it includes ``<eos>``) and, over residue targets
only, the NLL, the hits (argmax = target) and the count. Accuracy = hits / residues, perplexity =
exp(residue NLL / residues), summed over the whole evaluation before dividing (weighted by residues, not by batch).

Used by training validation (:class:`~proteinperformer.training.lm.ProteinLM`, whose device-side sums synchronise
across DDP ranks), ``pp-evaluate``'s masked residues, ``pp-convert --report`` and the Fig. 5 study, each through
:func:`batch_sums` directly or the loop :func:`score_batches`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from proteinperformer.data.collate import IGNORE_INDEX, CLMCollator, MLMCollator
from proteinperformer.tokenizer import Alphabet

EVAL_MASK_PROB = 0.15  # share of residues masked for evaluation (training's default mask_prob)
SUMS = ("nll", "n_supervised", "residue_nll", "residue_correct", "n_residue")


def residue_table(alphabet: Alphabet, vocab_size: int | None = None) -> torch.Tensor:
    """bool [vocab_size] (default ``len(alphabet)``): True at the ids of residue tokens (``Alphabet.residue_ids``)."""
    table = torch.zeros(vocab_size or len(alphabet), dtype=torch.bool)
    table[alphabet.residue_ids] = True
    return table


def evaluation_collator(alphabet: Alphabet, causal: bool,
                        mask_prob: float = EVAL_MASK_PROB) -> MLMCollator | CLMCollator:
    """The collator that makes evaluation targets: next tokens for a causal model, else ``mask_prob`` of the residues
    masked, every one replaced by ``<mask>`` (``MLMCollator.for_evaluation``, as the data module validates). Items are
    ``{"tokens": LongTensor [T] (<cls> ... <eos>), "seed": int}``; the seed fixes the masks."""
    if causal:
        return CLMCollator(alphabet)
    return MLMCollator.for_evaluation(alphabet, mask_prob)


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, is_residue: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Sums over one batch's targets: 0-d tensors on the logits' device, no host read.

    ``logits`` [B, T, V] (any float dtype; the NLL of each target is computed in float32), ``labels`` [B, T]
    (``IGNORE_INDEX`` where not supervised), ``is_residue`` bool [≥ V] on the same device (:func:`residue_table`).
    Returns ``nll`` and ``n_supervised`` (all targets) and ``residue_nll``, ``residue_correct``, ``n_residue``
    (residue targets only). ``dtype``: of the NLL sums (float32, the training loss's; float64 where sums of
    nearly equal models are compared at the 1e-7 level).
    """
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.to(dtype)
    supervised = labels != IGNORE_INDEX
    residue = supervised & is_residue[labels.clamp_min(0)]
    correct = (logits.argmax(-1) == labels) & residue
    return {"nll": nll.sum(), "n_supervised": supervised.sum(), "residue_nll": (nll * residue).sum(),
            "residue_correct": correct.sum(), "n_residue": residue.sum()}


def summarise(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Totals of :func:`batch_sums` (float64 tensors) -> ``{"accuracy", "perplexity", "residues", "loss"}`` (``loss``:
    mean NLL of all targets), 0-d tensors; accuracy and perplexity are NaN without a residue target."""
    n = sums["n_residue"]
    return {"accuracy": sums["residue_correct"] / n, "perplexity": torch.exp(sums["residue_nll"] / n), "residues": n,
            "loss": sums["nll"] / sums["n_supervised"].clamp_min(1)}


@torch.inference_mode()
def score_batches(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                  alphabet: Alphabet) -> dict[str, float | int]:
    """Accuracy / perplexity of a :class:`~proteinperformer.model.PerformerLM` over collated ``batches``
    (``input_ids``, ``labels``, ``padding_mask``; moved to the model's device): :func:`summarise` of the summed
    :func:`batch_sums`, accumulated in float64 as training validation accumulates them (``residues``: the residue
    targets scored). With no residue target (``residues`` 0) accuracy and perplexity are NaN."""
    device = next(model.parameters()).device
    is_residue = residue_table(alphabet).to(device)
    totals = {name: torch.zeros((), dtype=torch.float64, device=device) for name in SUMS}
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(batch["input_ids"], batch["padding_mask"])["logits"]
        for name, value in batch_sums(logits, batch["labels"], is_residue).items():
            totals[name] += value.double()
    scores = summarise(totals)
    return {"accuracy": float(scores["accuracy"]), "perplexity": float(scores["perplexity"]),
            "residues": int(scores["residues"]), "loss": float(scores["loss"])}
