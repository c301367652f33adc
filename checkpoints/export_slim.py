"""Export a slim copy of a training checkpoint (weights + hyper-parameters + alphabet, no optimiser state).

    python checkpoints/export_slim.py /tmp/refrun/reference_mlm/checkpoints/last.ckpt \
        checkpoints/pp_mlm_relu_2.7M.ckpt [--metrics /tmp/refrun/reference_mlm/metrics.json]

Prints the size, parameter count, step and (with --metrics) the numbers that go into README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from proteinperformer.checkpoints import export_slim, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint written by pp-train")
    parser.add_argument("dst", type=Path, help="slim checkpoint to write (temp file + rename)")
    parser.add_argument("--metrics", type=Path, help="the run's metrics.json, to print the model-card numbers")
    args = parser.parse_args()
    dst = export_slim(args.src, args.dst)
    model = load_model(dst)
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB (from {args.src.stat().st_size / 2**20:.1f} MiB), "
          f"{model.num_parameters():,} parameters, step {ckpt.get('global_step')}, task "
          f"{ckpt['hyper_parameters'].get('task')}\nconfig: {model.config.to_dict()}")
    if args.metrics:
        print(json.dumps(json.loads(args.metrics.read_text()), indent=2))


if __name__ == "__main__":
    main()
