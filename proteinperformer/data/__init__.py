"""FASTA reading, tokenised sequence collections, datasets, collators and the Lightning DataModule."""

from proteinperformer.data.collate import IGNORE_INDEX, CLMCollator, MLMCollator
from proteinperformer.data.datasets import ConcatChunkDataset, EpochShuffleSampler, SingleSequenceDataset
from proteinperformer.data.fasta import (
    FastaFormatError,
    FastaRecord,
    load_fasta,
    parse_uniprot_header,
    read_fasta,
)
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.data.splits import assign_split

__all__ = [
    "IGNORE_INDEX",
    "CLMCollator",
    "ConcatChunkDataset",
    "EpochShuffleSampler",
    "FastaFormatError",
    "FastaRecord",
    "MLMCollator",
    "SingleSequenceDataset",
    "TokenizedSequences",
    "assign_split",
    "load_fasta",
    "parse_uniprot_header",
    "read_fasta",
]
