"""Train a protein LM.  See conf/train.yaml and README.md.

    python scripts/train.py                                        # MLM Performer-ReLU on data/ (CPU)
    python scripts/train.py task=clm model=performer_softmax trainer.max_steps=200 data.max_len=512
    python scripts/train.py experiment=paper_bid_1024 trainer=gpu data.fasta_path=/data/uniref50.fasta.gz
"""

from proteinperformer.cli.train import main

if __name__ == "__main__":
    main()
