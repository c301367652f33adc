"""Linear probes (SS3, location, fold class, GO terms) on embeddings: python scripts/probe.py ... (= pp-probe)."""

from proteinperformer.cli.probe import main

if __name__ == "__main__":
    main()
