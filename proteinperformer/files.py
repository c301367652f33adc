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

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # Hydra's config folder: train.yaml and the groups


def resolve_path(path: str | Path) -> Path:
    """A path from a command line or a config: ``~`` expanded, a relative path read from the current directory."""
    return Path(path).expanduser()


class WriteError(OSError):
    """A file could not be written (full disk, no permission, read-only file system): one line naming the file.

    ``str(err)`` is the whole message, e.g. ``no space left on device while writing runs/x/last.ckpt``; ``errno``
    is the operating system's. Every ``pp-*`` command prints it as ``error: ...`` with exit status 1.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


# errno -> what the user is told; the advice says what the same command does once the cause is gone
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def _write_failure(err: BaseException) -> int | None:
    """The errno of a full disk / permission failure in ``err`` (also when a library such as pyarrow or HDF5 only
    names it in its message), else None."""
    if isinstance(err, WriteError):
        return None
    code = getattr(err, "errno", None)
    if code in WRITE_FAILURES:
        return code
    text = str(err).lower()
    if isinstance(err, OSError) and re.search(r"\d+ requested and \d+ written", text):  # numpy's short write
        return errno.ENOSPC
    if "unexpected pos" in text:  # torch.save's zip writer after a short write (it keeps no errno)
        return errno.ENOSPC
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded"),
                        (errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")):
        if words in text:
            return code
    return None


def write_failure_message(err: BaseException, path: str | Path | None = None) -> str | None:
    """``<reason> while writing PATH; <advice>`` for a full-disk / refused-write ``err`` (``path`` defaults to the
    error's own file name), else None: also for writers outside this package (Lightning's loggers)."""
    code = _write_failure(err)
    path = path if path is not None else getattr(err, "filename", None)
    if code is None or path is None:
        return None
    advice = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "choose a writable place"
    return f"{WRITE_FAILURES[code]} while writing {path}; {advice} and rerun the same command"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Within: a full disk or a refused write becomes :class:`WriteError` ``<reason> while writing PATH; free space
    (or fix the permission) and rerun the same command``. Every writer of the package goes through this (directly
    or through :func:`write_atomic`), so all commands word these failures alike."""
    try:
        yield
    except (OSError, RuntimeError) as err:  # h5py and torch.save report a full disk as RuntimeError
        message = write_failure_message(err, path)
        if message is None:
            raise
        raise WriteError(message, _write_failure(err)) from err


def require_free_space(path: str | Path, nbytes: int) -> None:
    """Raise the full-disk :class:`WriteError` for ``path`` unless its file system has ``nbytes`` free. For writers
    that cannot fail safely mid-write: HDF5 crashes the process at exit (segmentation fault) once a write has hit
    a full disk, so the HDF5 writer checks before each write instead."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise WriteError(f"{WRITE_FAILURES[errno.ENOSPC]} while writing {path} ({nbytes / 2**20:,.1f} MiB needed, "
                         f"{free / 2**20:,.1f} MiB free); free space and rerun the same command", errno.ENOSPC)


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp path beside ``path``, then rename it to ``path``; returns ``path``.
    A failed or killed write leaves only a hidden ``.NAME.*.tmp`` file, never a partial ``path``; a full disk or a
    refused write raises :class:`WriteError` naming ``path`` (:func:`writing`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # matches no reader's *.npy / *.parquet glob
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
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
