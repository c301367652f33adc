"""Where files are found: the project root (``conf/``, ``data/``) and the shared data folder.

A relative path given to a command or a config is tried from the current directory, then from the project
root, so ``data/uniprot_sample20k.fasta.gz`` works from anywhere. Large data shared between checkouts (UniProt
samples, probe sets, structures) is reached through ``$PP_SHARED_DATA``; unset, it is ``../shared/data``
beside the project root. Configs spell it ``${shared_data}`` (``conf/train.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "PP_SHARED_DATA"
DEFAULT_SHARED_DATA = "../shared/data"  # relative to the project root


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else relative to the project root (so configs work from any cwd)."""
    path = Path(path).expanduser()
    if path.exists() or path.is_absolute():
        return path
    candidate = PROJECT_ROOT / path
    return candidate if candidate.exists() else path


def shared_data_dir() -> Path:
    """The shared data folder: ``$PP_SHARED_DATA``, else ``../shared/data`` beside the project root."""
    return resolve_path(os.environ.get(SHARED_DATA_ENV) or DEFAULT_SHARED_DATA)
