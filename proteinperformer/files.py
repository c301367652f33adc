"""Files: where they are found (the Hydra configs inside the package, data paths from the current directory, the
shared data folder) and how they are written (a temp file beside the target, then a rename, so no reader ever sees
a half-written file).

The configs are ``conf/`` at the top of the repository; the package reaches them as ``proteinperformer/conf``, a
committed symlink to ``../conf`` in a checkout (editable install or ``PYTHONPATH``) and a real folder of package
data in the wheel, so :data:`CONFIG_DIR` is the same expression everywhere. A relative path given to a command or a
config is read from the current directory: ``data/uniprot_sample20k.fasta.gz`` is the checkout's sample when a
command runs from the checkout's root. Large data shared between checkouts (UniProt samples, probe sets,
structures) is reached through ``$PP_SHARED_DATA``; unset, it is ``../shared/data`` from the current directory.
Configs spell it ``${shared_data}`` (``conf/train.yaml``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # Hydra's config folder: train.yaml and the groups


def resolve_path(path: str | Path) -> Path:
    """A path from a command line or a config: ``~`` expanded, a relative path read from the current directory."""
    return Path(path).expanduser()


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp path beside ``path``, then rename it to ``path``; returns ``path``.
    A failed or killed write leaves only a hidden ``.NAME.*.tmp`` file, never a partial ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # matches no reader's *.npy / *.parquet glob
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file + rename."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (``indent``, trailing newline) to ``path`` through a temp file + rename."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def save_npy_atomic(path: str | Path, array: Any) -> Path:
    """``numpy.save`` ``array`` to ``path`` (a ``.npy`` name) through a temp file + rename."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, array)

    return write_atomic(path, write)


def save_figure_atomic(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG to ``path`` through a temp file + rename, then close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def read_csv(path: str | Path, what: str = "CSV", **kwargs: Any):
    """``pandas.read_csv(path, **kwargs)`` whose errors name the file and what to do (a folder, a missing or
    empty file, a malformed line): ValueError in one line. ``what`` names the expected content in messages."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give the {what} file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file; give the {what} file")
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty (no header line); give a {what} with a header and one row per "
                         "record") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{path}: not a readable {what} ({detail}); check the file is comma-separated "
                         "text") from None
