"""The vocabularies of the ``pp-*`` options (choices and defaults a ``--help`` shows), in one torch-free module.

A command's parser is built before anything runs, and ``pp-embed --help`` should answer at once: importing torch,
Lightning or scikit-learn for a list of choices took 5-7 s. So the choice lists live here, imported by the
modules that act on them (``inference.embed.INCLUDE`` is ``options.INCLUDE``) and by the parsers in ``cli/``.
This module imports nothing.
"""

from __future__ import annotations

# devices and precision (model.precision): --device, --precision
DEVICE_CHOICES = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"
INFERENCE_PRECISIONS = ("32", "bf16", "16")

# embeddings (inference.embed, inference.embed_files): pp-embed --include, --format, --label, --dtype
INCLUDE = ("mean", "per_tok", "bos", "contacts")
FORMATS = ("pt", "h5", "npz")
LABELS = ("accession", "header")  # accession: UniProt accession / first word; header: the whole line (esm-extract)
DTYPES = ("float32", "float16")

# variant scoring (inference.score): pp-score --scoring-strategy
STRATEGIES = ("wt-marginals", "masked-marginals", "pseudo-ll")

# attention vs substitution matrices (analysis.aminoacids, analysis.blosum_report): pp-attention-blosum
VIG_THRESHOLD = 0.3  # attention weight of a "high-confidence" edge (Vig et al. 2020)
VIG_MIN_EDGES = 100  # heads with fewer high-confidence edges are dropped
BLOSUM_MIN_RESIDUES = 30  # pp-attention-blosum skips (and counts) shorter proteins: too few pairs per head
MATRICES = ("BLOSUM62", "BLOSUM45", "BLOSUM80", "PAM250")
BLOSUM_METHODS = ("vig", "weighted")

# FAVOR+ conversion (evaluation.conversion): pp-convert --num-features
FEATURES = ("favor+", "oprf", "oprf-rescaled", "oprf-dense")  # the softmax kernel's feature maps (attention/oprf.py)
KERNELS = ("softmax", "relu", "hedgehog")  # the registered FAVOR feature maps (attention/features.py)
# pp-convert --transfer's default Adam steps per layer (model.transfer.default_steps): a fixed budget of work,
# TRANSFER_BUDGET / (depth × width × (m + TRANSFER_STEP_OFFSET)) rounded to tens and kept in TRANSFER_STEP_RANGE,
# since a step of one layer costs about width × (m + 128) (IgLM-S, 500 steps × 3 layers: 37 CPU-s at m = 64, 80 at
# m = 256). The budget is 500 steps of IgLM-S (3 layers × width 192) at m = 256, about 1.5 CPU-minutes here: the
# 13M IgLM (4 × 512) gets 140 steps, IgLM-S 1,000 at m = 64 and 300 at m = 512 (studies/fig5_iglm/README.md).
TRANSFER_STEP_OFFSET = 128
TRANSFER_BUDGET = 500 * 3 * 192 * (256 + TRANSFER_STEP_OFFSET)
TRANSFER_STEP_RANGE = (50, 2000)
DEFAULT_NUM_FEATURES = 256  # see docs/esm2.md "Which defaults, and why" (measured in studies/fig5_small/)

# the model card (evaluation.card): pp-evaluate
SECTIONS = ("mlm", "ss3", "location", "go_mf", "fold_class", "blosum", "contacts", "dms")
PROBES = {  # task: (train, valid, default --<task>-max-sequences)
    "ss3": ("data/probes/ss3/train.csv", "data/probes/ss3/valid.csv", None),
    "location": ("data/probes/deeploc/train.csv", "data/probes/deeploc/valid.csv", None),
    "go_mf": ("data/probes/go_mf/train.csv.gz", "data/probes/go_mf/valid.csv.gz", 3000),
    "fold_class": ("data/probes/fold_class/train.csv", "data/probes/fold_class/valid.csv", None),
}
CARD_BEGIN, CARD_END = "<!-- pp-evaluate:begin -->", "<!-- pp-evaluate:end -->"
