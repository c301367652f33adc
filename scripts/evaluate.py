"""A checkpoint's whole model card in one command: python scripts/evaluate.py CKPT --out DIR (= pp-evaluate)."""

from proteinperformer.cli.evaluate import main

if __name__ == "__main__":
    main()
