#!/usr/bin/env bash
# Every pp-* entry point that reads a checkpoint x three bad files, through the installed console scripts:
# counts the runs that end in exactly one stderr line "error: ...", exit 1, no traceback, and says whether the
# code-running pickle ever ran.   bash scripts/bad_checkpoint_matrix.sh   (after pip install -e .; ~2 min)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/.venv/bin}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$BIN/python" - "$W" <<'PY'
import os, sys, torch
w = sys.argv[1]
class RunsCode:
    def __reduce__(self):
        return (exec, (f"open({w + '/MARKER'!r}, 'w').write('ran')",))
torch.save({"state_dict": {"w": RunsCode()}, "hyper_parameters": {}}, f"{w}/code.ckpt")
open(f"{w}/random.ckpt", "wb").write(os.urandom(4096))
data = open("weights/pp_mlm_relu_2.7M.ckpt", "rb").read()
open(f"{w}/trunc.ckpt", "wb").write(data[: len(data) // 2])
PY
F=$ROOT/data/uniprot_sample20k.fasta.gz
P=$ROOT/data/probes/fold_class
D=$ROOT/data/dms
total=0; good=0
cd "$W"
for kind in random trunc code; do
  C=$W/$kind.ckpt
  for cmd in "pp-embed $C $F --out emb" "pp-generate $C --out out.fasta" "pp-probe $C --train $P/train.csv --valid $P/valid.csv" \
             "pp-evaluate $C --out card --skip ss3 location go_mf fold_class blosum contacts" "pp-convert $C --out conv.ckpt" \
             "pp-contacts $C" "pp-attention-blosum $C $F" \
             "pp-score $C $D/BLAT_ECOLX_Ranganathan2015.csv --out s.csv --fasta $D/BLAT_ECOLX.fasta --offset-idx 24" \
             "pp-train init_from=$C hydra.run.dir=$W/run" \
             "pp-train ckpt_path=$C hydra.run.dir=$W/run"; do
    set -- $cmd; tool=$1; shift
    err=$("$BIN/$tool" "$@" 2>&1 >/dev/null); rc=$?
    lines=$(printf "%s\n" "$err" | grep -c .)
    tb=$(printf "%s\n" "$err" | grep -c Traceback)
    total=$((total + 1)); [ "$rc" = 1 ] && [ "$lines" = 1 ] && [ "$tb" = 0 ] && good=$((good + 1))
    printf "%-20s %-7s exit=%s stderr_lines=%s traceback=%s | %.100s\n" "$tool" "$kind" "$rc" "$lines" "$tb" "$err"
  done
done
echo "one-line errors: $good of $total; the code-running pickle ran: $([ -e "$W/MARKER" ] && echo YES || echo no)"
