#!/usr/bin/env bash
# The faults of long runs (docs/faults.md), each through the installed console scripts: prints exit status, the
# number of stderr lines that are not warnings/progress, whether a traceback appeared, and the last stderr line.
#   bash scripts/fault_matrix.sh        (after pip install -e .; as root for the full-disk rows; ~4 min on 2 cores)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/.venv/bin}
W=$(mktemp -d)
DISK=$W/disk
mkdir -p "$DISK"
trap 'umount -l "$DISK" 2>/dev/null; rm -rf "$W"' EXIT
F=$ROOT/data/uniprot_sample20k.fasta.gz
CK=$ROOT/weights/pp_mlm_relu_2.7M.ckpt
zcat "$F" | head -4000 > "$W/small.fasta"
T="experiment=tiny data.fasta_path=$F data.max_sequences=400 trainer.max_steps=12 trainer.val_check_interval=6 trainer.limit_val_batches=2 trainer.log_every_n_steps=3 callbacks.periodic_checkpoint.every_n_train_steps=4 trainer.enable_progress_bar=false"
row() {  # row NAME COMMAND...
  local name=$1; shift
  err=$("$@" 2>&1 >/dev/null); rc=$?
  kept=$(printf "%s\n" "$err" | grep -v -E "warn|Warn|deprecated|^ |^$|%\||it/s|Tip|GPU available|TPU available|\`" )
  printf "%-28s exit=%-3s lines=%-2s traceback=%-3s | %.160s\n" "$name" "$rc" "$(printf "%s\n" "$kept" | grep -c .)" \
    "$(printf "%s\n" "$err" | grep -c Traceback)" "$(printf "%s\n" "$kept" | tail -1)"
}
cd "$W"
row divergence "$BIN/pp-train" $T model.lr=1e4 hydra.run.dir=$W/div
row straight-run "$BIN/pp-train" $T hydra.run.dir=$W/run
row resume-one-path "$BIN/pp-train" ckpt_path=$W/run/checkpoints/last.ckpt trainer.max_steps=14 hydra.run.dir=$W/run2
row resume-other-size "$BIN/pp-train" ckpt_path=$W/run/checkpoints/last.ckpt model.config.dim=128 hydra.run.dir=$W/run3
row resume-other-task "$BIN/pp-train" ckpt_path=$W/run/checkpoints/last.ckpt task=clm hydra.run.dir=$W/run4
( "$BIN/pp-train" $T trainer.max_steps=400 hydra.run.dir=$W/term >/dev/null 2>"$W/term.err" & pid=$!
  for _ in $(seq 600); do [ -e "$W/term/checkpoints/step4.ckpt" ] && break; sleep 0.5; done  # training has begun
  kill -TERM $pid; wait $pid; echo "exit=$?" >> "$W/term.err" )
printf "%-28s %s | %s\n" sigterm "$(tail -1 "$W/term.err")" "$(grep -E "SIGTERM|error" "$W/term.err" | tail -1)"
"$BIN/pp-preprocess" "$W/small.fasta" --out "$W/store" --chunk-mb 0.1 --quiet >/dev/null
row verify-clean "$BIN/pp-preprocess" --verify "$W/store" --quiet
python3 -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[-3]^=1; open(p,'wb').write(b)" \
  "$W/store/shards/0000-000001/tokens.npy"
row verify-damaged "$BIN/pp-preprocess" --verify "$W/store" --quiet
python3 -c "import os, sys; p=sys.argv[1]; os.truncate(p, os.path.getsize(p) // 2)" \
  "$W/store/shards/0000-000002/tokens.npy"
row train-truncated-store "$BIN/pp-train" $T data=uniprot_store data.store_path=$W/store hydra.run.dir=$W/srun
if mount -t tmpfs -o size=1m tmpfs "$DISK" 2>/dev/null; then
  row full-disk-preprocess "$BIN/pp-preprocess" "$W/small.fasta" --out "$DISK/store" --chunk-mb 0.1 --quiet
  rm -rf "${DISK:?}"/*
  for fmt in pt h5 npz; do
    row "full-disk-embed-$fmt" "$BIN/pp-embed" "$CK" "$W/small.fasta" "$DISK/emb" --format $fmt --include mean per_tok
    rm -rf "${DISK:?}"/*
  done
  row full-disk-convert "$BIN/pp-convert" "$CK" "$DISK/conv.ckpt"
  row full-disk-train "$BIN/pp-train" $T logger.csv.save_dir=$W/logs hydra.run.dir=$DISK/run
  mount -o remount,ro "$DISK"
  row read-only-preprocess "$BIN/pp-preprocess" "$W/small.fasta" --out "$DISK/store2" --quiet
else
  echo "full-disk rows skipped: mounting a tmpfs needs root"
fi
