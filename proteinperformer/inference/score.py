"""Zero-shot variant-effect scores from a masked LM (the Python API behind ``pp-score``), as ESM-1v's ``predict.py``.

    from proteinperformer import load_model
    from proteinperformer.inference.score import score_variants
    model = load_model("esm2_t33_650M_UR50D.pt")
    scores = score_variants(model, wt_sequence, ["H24C", "H24C:A25G"], offset_idx=24,
                            strategy="masked-marginals")   # float64 [n_variants], higher = more fit

A variant is one or more substitutions ``<wt><position><mt>`` joined by ``:`` (``H24C:A25G``); ``position`` counts
from ``offset_idx`` (the number of the sequence's first residue). Strategies (Meier et al. 2021, higher = more fit):

- ``wt-marginals``: one pass over the wild type; a variant scores Σ over its substitutions of
  log p(mt | wt sequence) − log p(wt | wt sequence) at that position.
- ``masked-marginals``: the same sum with each mutated position masked in the wild type (one masked copy per
  distinct position, all positions of all variants batched together).
- ``pseudo-ll``: the pseudo-log-likelihood of each whole mutant, Σ_i log p(x_i | x with position i masked) over
  every residue i (one masked copy per residue per distinct mutant; L forward rows per mutant). ESM-1v's
  ``predict.py`` sums over ``range(1, len(sequence) - 1)`` of the tokens and reads ``sequence[i]`` at token ``i``,
  an off-by-one that scores position i−1's letter at masked position i and leaves out the last residue; this
  module computes the pseudo-log-likelihood as defined (every residue, its own letter).

Masked copies of one sequence all have the same length, so a batch has no padding and a row scores exactly as it
does alone (tested against a loop over single sequences). Baselines that need no model, for reading a ρ:
:func:`blosum_scores` (BLOSUM62 of each substitution) and :func:`unigram_scores` (log f(mt) − log f(wt), the unigram
baseline's frequencies: :mod:`proteinperformer.data.unigram`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from proteinperformer.inference.embed import residue_limit
from proteinperformer.model import PerformerLM
from proteinperformer.model.precision import check_inference_precision, inference_autocast
from proteinperformer.options import STRATEGIES
from proteinperformer.tokenizer import STANDARD_RESIDUES

_SUBSTITUTION = re.compile(r"^([A-Za-z])(-?\d+)([A-Za-z])$")

Substitution = tuple[int, str, str]  # (0-based index into the sequence, wild-type letter, mutant letter)


class VariantError(ValueError):
    """A variant that cannot be scored: unparsable, outside the sequence, or its wild type does not match."""


# ---- parsing ------------------------------------------------------------------------------------
def parse_variant(text: str, sequence: str, offset_idx: int = 1, where: str = "variant") -> list[Substitution]:
    """``"H24C:A25G"`` -> [(index, "H", "C"), (index, "A", "G")] checked against ``sequence``.

    ``index`` = position − ``offset_idx``. Raises :class:`VariantError` (message starts with ``where``) for a
    malformed substitution, a position outside the sequence, a repeated position, or a wild-type letter that
    differs from the sequence at that position.
    """
    text = str(text).strip()
    if not text or text.lower() == "nan":
        raise VariantError(f"{where}: empty mutation; expected e.g. H24C or H24C:A25G")
    subs: list[Substitution] = []
    for part in text.split(":"):
        m = _SUBSTITUTION.match(part.strip())
        if not m:
            raise VariantError(f"{where}: {part!r} is not a substitution like H24C (wild type, position, mutant)")
        wt, pos, mt = m.group(1).upper(), int(m.group(2)), m.group(3).upper()
        idx = pos - offset_idx
        if not 0 <= idx < len(sequence):
            raise VariantError(f"{where}: {part} is outside the sequence (positions {offset_idx}.."
                               f"{offset_idx + len(sequence) - 1} with --offset-idx {offset_idx})")
        if sequence[idx] != wt:
            raise VariantError(f"{where}: {part} says wild type {wt} at position {pos}, but the sequence has "
                               f"{sequence[idx]} there (index {idx} with --offset-idx {offset_idx}); check "
                               f"--offset-idx and the sequence, or pass --skip-mismatched to count and skip such rows")
        if mt not in STANDARD_RESIDUES:
            raise VariantError(f"{where}: {part}: mutant {mt!r} is not one of the 20 amino acids")
        if any(s[0] == idx for s in subs):
            raise VariantError(f"{where}: position {pos} is mutated twice in {text!r}")
        subs.append((idx, wt, mt))
    return subs


def mutant_sequence(sequence: str, subs: Iterable[Substitution]) -> str:
    """The sequence with the substitutions applied."""
    seq = list(sequence)
    for idx, _, mt in subs:
        seq[idx] = mt
    return "".join(seq)


# ---- model scores -------------------------------------------------------------------------------
def _check_model(model: PerformerLM, sequence: str) -> None:
    cfg = model.config
    if cfg.causal:
        raise ValueError("variant scoring needs a masked LM (task mlm or an ESM-2 model); this model is causal")
    limit = residue_limit(cfg)
    if limit is not None and len(sequence) > limit:
        raise ValueError(f"the sequence has {len(sequence)} residues but this model takes at most {limit} in one pass "
                         f"({cfg.attention} attention, {cfg.positions} positions); with rotary or sinusoidal "
                         "positions use --attention favor (FAVOR+, no length cap)")
    model.alphabet.encode(sequence, "sequence")


@torch.inference_mode()
def _masked_log_probs(model: PerformerLM, tokens: torch.Tensor, positions: Sequence[int], precision: str,
                      toks_per_batch: int) -> torch.Tensor:
    """log p(· | tokens with token position p masked) at p, for each p of ``positions``: float64 [P, V] on CPU.

    ``tokens`` [T] is one tokenised sequence; each row of a batch is a copy with one position masked."""
    device = next(model.parameters()).device
    rows = max(1, toks_per_batch // tokens.numel())
    out = []
    for start in range(0, len(positions), rows):
        pos = torch.as_tensor(positions[start : start + rows], dtype=torch.long)
        batch = tokens.repeat(len(pos), 1)
        batch[torch.arange(len(pos)), pos] = model.alphabet.mask_idx
        with inference_autocast(precision, device):
            logits = model(batch.to(device))["logits"]
        picked = logits.float()[torch.arange(len(pos), device=device), pos.to(device)]
        out.append(torch.log_softmax(picked, dim=-1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(model.alphabet), dtype=torch.float64)


def _tokens(model: PerformerLM, sequence: str) -> torch.Tensor:
    return model.alphabet.get_batch_converter()([("s", sequence)])[2][0]


def pseudo_log_likelihoods(model: PerformerLM, sequences: Sequence[str], precision: str = "32",
                           toks_per_batch: int = 4096, progress: bool = False, unit: str = "sequence") -> np.ndarray:
    """Σ_i log p(x_i | x with residue i masked) of each sequence: float64 [N]. With ``progress`` the first
    sequence is timed and the estimate for all of them printed before the rest run (``pseudo-ll: 263 mutants x
    22.1 s per mutant ~ 1.6 h``), then a bar counts them (``unit``: what a sequence is, singular)."""
    from proteinperformer.progress import announce, track

    def pll(seq: str) -> float:
        tokens = _tokens(model, seq)
        lp = _masked_log_probs(model, tokens, list(range(1, len(seq) + 1)), precision, toks_per_batch)
        return float(lp[torch.arange(len(seq)), tokens[1 : len(seq) + 1]].sum())

    out = np.zeros(len(sequences))
    if not len(sequences):
        return out
    start = time.perf_counter()
    out[0] = pll(sequences[0])
    if progress:
        announce("pseudo-ll", len(sequences), unit, time.perf_counter() - start)
    bar = track(sequences[1:], desc="pseudo-ll", unit=unit, initial=1, total=len(sequences), disable=not progress)
    for n, seq in enumerate(bar, start=1):
        out[n] = pll(seq)
    return out


def score_variants(
    model: PerformerLM,
    sequence: str,
    variants: Sequence[str | None],
    offset_idx: int = 1,
    strategy: str = "masked-marginals",
    precision: str = "32",
    toks_per_batch: int = 4096,
    progress: bool = False,
) -> np.ndarray:
    """Score each variant (``"H24C"``, ``"H24C:A25G"``; None = not scored) of ``sequence``: float64 [N], NaN where
    None. See the module docstring for ``strategy``; ``offset_idx`` is the position of the first residue.
    A variant that does not parse or whose wild type does not match raises :class:`VariantError` naming its index.
    ``precision`` "bf16" / "16" runs the model under autocast; log-probabilities are summed in float64.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    sequence = sequence.upper().removesuffix("*")
    _check_model(model, sequence)
    check_inference_precision(precision, next(model.parameters()).device)
    parsed = [None if v is None else parse_variant(v, sequence, offset_idx, f"variant {i} ({v!r})")
              for i, v in enumerate(variants)]
    scores = np.full(len(parsed), np.nan)
    tok = model.alphabet.tok_to_idx
    tokens = _tokens(model, sequence)
    if strategy == "pseudo-ll":
        mutants = sorted({mutant_sequence(sequence, s) for s in parsed if s is not None})
        plls = pseudo_log_likelihoods(model, mutants, precision, toks_per_batch, progress, unit="mutant")
        pll = dict(zip(mutants, plls, strict=True))
        for i, subs in enumerate(parsed):
            if subs is not None:
                scores[i] = pll[mutant_sequence(sequence, subs)]
        return scores
    if strategy == "wt-marginals":
        device = next(model.parameters()).device
        with torch.inference_mode(), inference_autocast(precision, device):
            logits = model(tokens[None].to(device))["logits"]
        lp = torch.log_softmax(logits.float()[0], dim=-1).double().cpu()  # [T, V], row 1 + index = residue index
        row = {idx: lp[1 + idx] for idx in range(len(sequence))}
    else:
        positions = sorted({idx for subs in parsed if subs is not None for idx, _, _ in subs})
        lp = _masked_log_probs(model, tokens, [1 + p for p in positions], precision, toks_per_batch)
        row = dict(zip(positions, lp, strict=True))
    for i, subs in enumerate(parsed):
        if subs is not None:
            scores[i] = sum(float(row[idx][tok[mt]] - row[idx][tok[wt]]) for idx, wt, mt in subs)
    return scores


# ---- baselines ----------------------------------------------------------------------------------
def blosum_scores(variants: Sequence[list[Substitution] | None], matrix: str = "BLOSUM62") -> np.ndarray:
    """Σ over each variant's substitutions of the substitution-matrix entry (wt, mt): float64 [N], NaN for None."""
    from Bio.Align import substitution_matrices

    m = substitution_matrices.load(matrix)
    return np.array([np.nan if s is None else float(sum(m[wt][mt] for _, wt, mt in s)) for s in variants])


def unigram_scores(variants: Sequence[list[Substitution] | None], frequencies: dict[str, float]) -> np.ndarray:
    """Σ over each variant's substitutions of log f(mt) − log f(wt) (the unigram LM's log-ratio): float64 [N], NaN
    for None. ``frequencies``: {letter: f}, the unigram baseline's
    (:func:`~proteinperformer.data.unigram.fasta_unigram_frequencies`)."""
    return np.array([np.nan if s is None else
                     sum(math.log(frequencies[mt]) - math.log(frequencies[wt]) for _, wt, mt in s) for s in variants])


def spearman(scores: Sequence[float], target: Sequence[float]) -> tuple[float, int]:
    """(Spearman ρ, number of pairs) over the rows where both are finite; ρ is NaN with fewer than 3 pairs."""
    from scipy.stats import spearmanr

    a, b = np.asarray(scores, dtype=np.float64), np.asarray(target, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return float("nan"), int(keep.sum())
    return float(spearmanr(a[keep], b[keep]).statistic), int(keep.sum())
