"""FASTA -> sharded token store. Thin CLI over ``proteinperformer.cli.preprocess`` (also ``pp-preprocess``).

Example::

    python scripts/preprocess.py /path/uniprot_trembl.fasta.gz --out /data/trembl_store --workers 16 --dedup
"""

from proteinperformer.cli.preprocess import main

if __name__ == "__main__":
    main()
