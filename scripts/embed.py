"""Extract embeddings like esm-extract: python scripts/embed.py CHECKPOINT FASTA OUTDIR [options] (= pp-embed)."""

from proteinperformer.cli.embed import main

if __name__ == "__main__":
    main()
