"""Linear probes (secondary structure, localisation) on embeddings: python scripts/probe.py ... (= pp-probe)."""

from proteinperformer.probe import main

if __name__ == "__main__":
    main()
