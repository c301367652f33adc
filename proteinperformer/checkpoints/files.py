"""Reading and writing checkpoint files safely: no code runs on load, no half-written file on save.

Every checkpoint this package reads goes through :func:`read_torch` (``torch.load(weights_only=True)``, with
fair-esm's ``argparse.Namespace`` as the only extra allowed class), and every one it writes through
:func:`save_atomic` (temp file + rename). Failures raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A file is not a readable checkpoint of a supported kind; the message names the file and what is wrong."""


def read_torch(path: str | Path) -> object:
    """torch.load with weights_only=True and argparse.Namespace (fair-esm's cfg) as the only allowed class.

    Raises :class:`CheckpointError` for a file that is not a torch file (random bytes, truncated) or that
    holds pickled objects outside the allow-list (a pickle that would run code is refused, not run).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or truncated file
        msg = str(err).split("\n")[0][:300]
        if "Unsupported global" in str(err) or "weights_only" in str(err):
            raise CheckpointError(f"{path}: holds pickled objects outside the allow-list (tensors, dicts, "
                                  f"argparse.Namespace); refusing to run code from it ({msg})") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint; truncated or corrupt? "
                              f"({type(err).__name__}: {msg})") from None


def save_atomic(obj: object, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` through a temp file + rename (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
