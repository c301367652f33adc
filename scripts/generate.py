"""Sample protein sequences from a CLM checkpoint into a FASTA file (same as the ``pp-generate`` command).

    python scripts/generate.py runs/clm/.../checkpoints/last.ckpt samples.fasta --num_samples 20 \
        --max_length 400 --temperature 0.8 --top_p 0.95 --prompt M --seed 0

See ``proteinperformer/generate.py``; FAVOR+ models decode in constant time per token, exact ones with a KV cache.
"""

from proteinperformer.generate import main

if __name__ == "__main__":
    main()
