"""Score MLM checkpoints on the same validation and test batches of one data config (15% masks, all <mask>).

    python studies/reference_model/compare_checkpoints.py weights/pp_mlm_relu_2.7M.ckpt \
        runs/reference/<run>/checkpoints/last.ckpt --experiment reference \
        --out studies/reference_model/results/reference_comparison.json

The data come from ``conf/train.yaml`` with ``experiment=...`` (the reference's: the Swiss-Prot corpus split
98/1/1, 256-token windows, ``trainer.limit_val_batches`` / ``--test-batches`` batches of 16), loaded once; every
checkpoint is scored on exactly the same residues. This is how the reference checkpoint's replacement is decided.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir

from proteinperformer.files import CONFIG_DIR
from proteinperformer.training.train import score_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--experiment", default="reference", help="conf/experiment/*.yaml whose data to use")
    parser.add_argument("--eval-mask-prob", type=float, default=0.15)
    parser.add_argument("--test-batches", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    for ckpt in args.checkpoints:
        if not ckpt.exists():
            raise SystemExit(f"error: {ckpt}: no such checkpoint")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={args.experiment}", f"data.eval_mask_prob={args.eval_mask_prob}",
                                          "data.num_workers=0"])
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    rows = []
    for ckpt in args.checkpoints:
        score = score_checkpoint(ckpt, cfg.task_name, datamodule, cfg.trainer.limit_val_batches, args.test_batches)
        rows.append({"checkpoint": str(ckpt), **score})
        print(f"{ckpt}: valid {100 * score['val_acc']:.2f}% / {score['val_ppl']:.3f}, test "
              f"{100 * score['test_acc']:.2f}% / {score['test_ppl']:.3f} (unigram valid "
              f"{100 * score['baseline_acc']:.2f}% / {score['baseline_ppl']:.3f})", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
