"""proteinperformer: Performer (FAVOR+) protein language models.

The functions users call, importable from the top level::

    from proteinperformer import load_model, embed
    model = load_model("weights/pp_mlm_relu_2.7M.ckpt")      # or an ESM-2 .pt / Hugging Face ESM directory
    reps = embed(model, [("P12345", "MKTAYIAKQR")], layers=[-1], include=["mean", "per_tok"])

Names are loaded on first use, so ``import proteinperformer.attention`` (plain torch) does not pull in
Lightning or Hydra. The layout (docs/layout.md): ``attention`` → ``model`` → ``checkpoints`` → ``data`` →
``training`` → ``analysis`` → ``inference`` → ``evaluation`` → ``cli``; each imports only those before it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    # attention (plain torch)
    "favor_attention": "proteinperformer.attention",
    "exact_attention": "proteinperformer.attention",
    "MultiheadSelfAttention": "proteinperformer.attention",
    # model
    "ModelConfig": "proteinperformer.model",
    "PerformerLM": "proteinperformer.model",
    "convert_attention": "proteinperformer.model",
    # tokenizer
    "Alphabet": "proteinperformer.tokenizer",
    # checkpoints
    "load_model": "proteinperformer.checkpoints",
    "save_checkpoint": "proteinperformer.checkpoints",
    "CheckpointError": "proteinperformer.checkpoints",
    # data
    "read_fasta": "proteinperformer.data.fasta",
    "ProteinDataModule": "proteinperformer.data.datamodule",
    # training
    "ProteinLM": "proteinperformer.training.lm",
    "train": "proteinperformer.training.train",
    # inference
    "embed": "proteinperformer.inference.embed",
    "read_embeddings": "proteinperformer.inference.embed_files",
    "load_clm": "proteinperformer.inference.generate",
    "sample": "proteinperformer.inference.generate",
    "score_variants": "proteinperformer.inference.score",
    # analysis
    "attention_maps": "proteinperformer.analysis",
    "predict_contact_map": "proteinperformer.analysis",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'proteinperformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
