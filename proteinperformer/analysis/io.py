"""Loading a model checkpoint and a set of protein sequences for the analyses."""

from __future__ import annotations

import random
from pathlib import Path

from proteinperformer.data.fasta import read_fasta
from proteinperformer.model import PerformerLM


def load_model(path: str | Path, device: str = "cpu") -> PerformerLM:
    """The PerformerLM of a training checkpoint (``.ckpt``), in eval mode on ``device``.

    Uses ``proteinperformer.embed.load_model`` when that module is available, else loads the
    Lightning checkpoint directly.
    """
    try:
        from proteinperformer.embed import load_model as _embed_load
    except ImportError:
        _embed_load = None
    if _embed_load is not None:
        model = _embed_load(path, device)
    else:
        from proteinperformer.lm import ProteinLM

        model = ProteinLM.load_from_checkpoint(str(path), map_location=device)
    net = model.model if hasattr(model, "model") and isinstance(model.model, PerformerLM) else model
    return net.to(device).eval()


def read_sequences(
    path: str | Path, n: int | None = None, min_len: int = 30, max_len: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """(id, sequence) pairs from a FASTA file: those with ≥ ``min_len`` residues, longer ones cropped to
    ``max_len``; a random subset of ``n`` (fixed ``seed``) when ``n`` is given, in file order."""
    records = [(r.id, r.sequence.upper().rstrip("*")) for r in read_fasta(path)]
    records = [(i, s[:max_len] if max_len else s) for i, s in records if len(s) >= min_len]
    if n is not None and n < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), n))
        records = [records[i] for i in keep]
    return records
