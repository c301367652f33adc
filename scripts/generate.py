"""Sample protein sequences from a CLM checkpoint into a FASTA file (same as the ``pp-generate`` command).

    python scripts/generate.py runs/clm/.../checkpoints/last.ckpt samples.fasta --num-samples 20 \
        --max-length 400 --temperature 0.8 --top-p 0.95 --prompt M --seed 0

See ``proteinperformer/inference/generate.py``: FAVOR+ models decode in constant time per token, exact ones
with a KV cache.
"""

from proteinperformer.cli.generate import main

if __name__ == "__main__":
    main()
