"""Validate an install on a GPU node: CUDA tests, 20 bf16 training steps of the paper presets, attention bench.

    python scripts/gpu_check.py --out results/gpu_check      # also installed as pp-gpu-check
"""

from proteinperformer.cli.gpu_check import main

if __name__ == "__main__":
    main()
