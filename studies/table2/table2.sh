#!/usr/bin/env bash
# The Table-2 sweep (studies/table2/README.md, conf/experiment/table2.yaml): one lane per task, one core each,
# then the two-column scoring (same steps, same wall-clock) on valid and test into studies/table2/results/.
#   bash studies/table2/table2.sh mlm & bash studies/table2/table2.sh clm & wait
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
task="${1:?usage: $0 mlm|clm}"
.venv/bin/python scripts/train.py -m experiment=table2 "task=$task" model=performer_relu,performer_softmax,transformer
.venv/bin/python studies/table2/table2.py runs/table2 --tasks "$task"     # studies/table2/results/table2_$task.{md,json}
