"""Attention-derived amino-acid similarity vs BLOSUM62 (Vig et al. 2020); see proteinperformer.analysis.blosum_cli.

    python scripts/attention_vs_blosum.py CHECKPOINT FASTA --n-seqs 800 --out results/
"""

from proteinperformer.analysis.blosum_cli import main

if __name__ == "__main__":
    main()
