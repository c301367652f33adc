"""Contacts from attention vs real PDB structures (ESM-style); see proteinperformer.cli.contacts.

    python scripts/contacts.py CHECKPOINT --structures data/structures/pdb_chains_subset60.npz \
        --train-chains 20 --out results/
"""

from proteinperformer.cli.contacts import main

if __name__ == "__main__":
    main()
