"""Attention analysis for biologists: attention maps, amino-acid similarity vs BLOSUM, contacts vs structure.

* :mod:`.maps` — attention maps of any checkpoint (FAVOR+ maps recovered with one-hot values, in blocks).
* :mod:`.aminoacids` — Vig et al. 2020 amino-acid aggregation (their binarised method and an attention-weighted
  variant) and comparison with substitution matrices.
* :mod:`.contacts` — ESM-style contact prediction (symmetrise + APC + logistic regression) and precision.
"""

from .aminoacids import (
    AMINO_ACIDS,
    VIG_MIN_EDGES,
    VIG_THRESHOLD,
    aa_similarity,
    attention_counts,
    attention_fractions,
    binarised_target_counts,
    cluster_order,
    compare_to_matrices,
    offdiagonal_pearson,
    pair_counts,
    pair_counts_from_maps,
    random_init_like,
    substitution_matrix,
    vig_compare,
    vig_fractions,
)
from .contacts import (
    Chain,
    ContactHead,
    apc,
    background_rate,
    contact_features,
    contact_map,
    contact_precisions,
    evaluate_contacts,
    load_structures,
    precision_at,
    predict_contact_map,
    symmetrize,
)
from .maps import AttentionBlock, as_performer, attention_inputs, attention_maps, iter_attention_blocks

__all__ = [
    "AMINO_ACIDS",
    "VIG_MIN_EDGES",
    "VIG_THRESHOLD",
    "AttentionBlock",
    "Chain",
    "ContactHead",
    "aa_similarity",
    "apc",
    "as_performer",
    "attention_counts",
    "attention_fractions",
    "attention_inputs",
    "attention_maps",
    "background_rate",
    "binarised_target_counts",
    "cluster_order",
    "compare_to_matrices",
    "contact_features",
    "contact_map",
    "contact_precisions",
    "evaluate_contacts",
    "iter_attention_blocks",
    "load_structures",
    "offdiagonal_pearson",
    "pair_counts",
    "pair_counts_from_maps",
    "precision_at",
    "predict_contact_map",
    "random_init_like",
    "substitution_matrix",
    "symmetrize",
    "vig_compare",
    "vig_fractions",
]
