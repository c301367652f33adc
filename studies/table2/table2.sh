#!/usr/bin/env bash
# The Table-2 sweep of README.md (conf/experiment/table2.yaml): one lane per task, one core each, then the
# two-column scoring (same steps, same wall-clock) on valid and test.
#   bash scripts/table2.sh mlm & bash scripts/table2.sh clm & wait
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
task="${1:?usage: $0 mlm|clm}"
.venv/bin/python scripts/train.py -m experiment=table2 "task=$task" model=performer_relu,performer_softmax,transformer
.venv/bin/python scripts/table2.py runs/table2 --tasks "$task" --out "results/table2_$task"
