"""Attention-derived amino-acid similarity vs BLOSUM62 (Vig et al. 2020); see proteinperformer.cli.attention_blosum.

    python scripts/attention_vs_blosum.py CHECKPOINT FASTA --n-seqs 800 --out results/
"""

from proteinperformer.cli.attention_blosum import main

if __name__ == "__main__":
    main()
