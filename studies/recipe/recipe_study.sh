#!/usr/bin/env bash
# The recipe study (studies/recipe/README.md): one Hydra multirun per factor around the base of
# conf/experiment/recipe.yaml, each run 6.5 minutes on one core. Two lanes (one core each) run side by side on a
# 2-core machine; run from anywhere, the runs go to runs/recipe/ of the repository:
#   bash studies/recipe/recipe_study.sh a & bash studies/recipe/recipe_study.sh b & wait
#   bash studies/recipe/recipe_study.sh combined
#   python studies/recipe/summarize_runs.py runs/recipe --out studies/recipe/results/recipe --minutes 6.5 \
#       --rescore-masks 0.15
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
train() { .venv/bin/python scripts/train.py -m experiment=recipe "$@"; }
case "${1:-a}" in
  a)
    train hydra.sweep.subdir=base                                   # the base itself
    train model.lr=4e-3
    train data.mask_prob=0.3
    train data.max_len=128
    train model.config.dim=256 model.config.depth=4 model.config.heads=8   # ~2.6M parameters, as 192 x 6
    ;;
  b)
    train model.config.use_projection=true                        # m = 256 projection, redrawn every 1000 steps
    train model.config.use_projection=true callbacks.feature_redraw.every_n_steps=100
    train model.lr=1e-3
    train model.warmup_steps=25
    train model.lr=8e-3
    ;;
  combined)   # the single-factor winners together (the reference recipe), at 256- and 128-token crops
    train model.lr=4e-3 data.mask_prob=0.3 model.warmup_steps=25
    train model.lr=4e-3 data.mask_prob=0.3 model.warmup_steps=25 data.max_len=128
    ;;
  *) echo "usage: $0 a|b|combined" >&2; exit 2 ;;
esac
