"""Zero-shot variant-effect ρ on the TEM-1 β-lactamase scan shipped in ``data/dms/`` (Stiffler et al. 2015; 4,996
substitutions, fitness at 2,500 µg/mL ampicillin), for a model beside a random-init copy of it and the two
model-free baselines (BLOSUM62, unigram log-ratio), with the published numbers of Meier et al. 2021 (ESM-1v).
Used by ``pp-evaluate`` (the card's ``dms`` section) and ``studies/reference_model/score_dms.py`` (the study's table).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from proteinperformer.analysis.aminoacids import random_init_like
from proteinperformer.data.unigram import fasta_unigram_frequencies, unigram_description
from proteinperformer.files import resolve_path
from proteinperformer.inference.score import blosum_scores, parse_variant, score_variants, spearman, unigram_scores
from proteinperformer.tokenizer import Alphabet

TEM1_CSV = "data/dms/BLAT_ECOLX_Ranganathan2015.csv"
TEM1_OFFSET = 24  # the first residue of TEM1 is position 24 of the study's numbering
TEM1 = ("HPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRPEERFPMMSTFKVLLCGAVLSRVDAGQEQLGRRIHYSQNDLVEYSPVTEKHLTDGMTVRELCSAAITMS"
        "DNTAANLLLTTIGGPKELTAFLHNMGDHVTRLDRWEPELNEAIPNDERDTTMPAAMATTLRKLLTGELLTLASRQQLIDWMEADKVAGPLLRSALPAGWFIADKSGA"
        "GERGSRGIIAALGPDGKPSRIVVIYTTGSQATMDERNRQIAEIGASLIKHW")
PUBLISHED = {"ESM-1v (zero-shot, 5 models)": 0.725, "ESM-1b": 0.724, "MSA Transformer": 0.773, "DeepSequence": 0.776,
             "EVmutation": 0.718, "site-independent PSSM": 0.614, "ProtBERT-BFD": 0.507, "TAPE": 0.144,
             "UniRep": 0.032}


def tem1_rho(model, csv: str | Path = TEM1_CSV, strategies=("masked-marginals",),
             null_seed: int | None = 0, unigram_fasta: str = "data/uniprot_sample20k.fasta.gz",
             precision: str = "32") -> dict:
    """ρ against the ``2500`` column for each strategy of ``model`` (and of a random-init copy unless
    ``null_seed`` is None), BLOSUM62 and the unigram log-ratio (frequencies over every sequence of
    ``unigram_fasta``): ``{"rho": {name: ρ}, "n": pairs, "unigram": what its frequencies count, ...}``."""
    df = pd.read_csv(resolve_path(csv), encoding="utf-8-sig")
    target = pd.to_numeric(df["2500"], errors="coerce").to_numpy(dtype=np.float64)
    variants = list(df["mutant"])
    parsed = [parse_variant(v, TEM1, TEM1_OFFSET) for v in variants]
    rho, seconds = {}, {}
    models = {"model": model} | ({} if null_seed is None else {"random init": random_init_like(model, null_seed)})
    for who, m in models.items():
        for strategy in strategies:
            t = time.perf_counter()
            scores = score_variants(m, TEM1, variants, TEM1_OFFSET, strategy, precision)
            seconds[f"{who} {strategy}"] = round(time.perf_counter() - t, 1)
            rho[f"{who} {strategy}"], n = spearman(scores, target)
    rho["BLOSUM62(wt, mt)"], _ = spearman(blosum_scores(parsed), target)
    alphabet = Alphabet()
    freqs = fasta_unigram_frequencies(resolve_path(unigram_fasta), alphabet)
    rho["unigram log f(mt)/f(wt)"], _ = spearman(unigram_scores(parsed, freqs), target)
    return {"rho": rho, "n": n, "n_rows": len(df), "target": "2500", "seconds": seconds,
            "unigram_fasta": unigram_fasta, "unigram": unigram_description(alphabet, f"whole-file ({unigram_fasta})")}
