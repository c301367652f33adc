"""Progress that suits where it is shown: a live bar on a terminal, one plain line now and then in a log file.

In a non-terminal log (SLURM, nohup, CI) a tqdm bar's carriage-return refreshes pile up into one ever-growing
line. :func:`track` (a tqdm for loops) and the Lightning callbacks of :mod:`.lightning` (:func:`progress_bar`
for training, :class:`~.lightning.ItemProgressBar` for ``Trainer.predict``) turn into periodic one-line updates
there: every ``LOG_EVERY_SECONDS`` and at the end. :func:`announce` states a long job's estimate before it starts.

This module imports only tqdm (``import proteinperformer.progress`` stays fast); the Lightning callbacks and
:func:`~.lightning.lightning_notices_silenced` (what Lightning prints, off unless ``verbose``) are in
:mod:`.lightning`, imported where a command runs Lightning.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import ProgressBar

LOG_EVERY_SECONDS = 30.0


class _LineStream:
    """A file for tqdm that writes each refresh as its own line (tqdm redraws with a leading carriage return)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def track(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; elsewhere a tqdm that writes one line every
    ``LOG_EVERY_SECONDS`` (and a last one when it ends) instead of redrawing in place."""
    if not disable and not sys.stderr.isatty():
        kwargs = {**kwargs, "file": _LineStream(sys.stderr), "mininterval": LOG_EVERY_SECONDS, "ascii": True,
                  "dynamic_ncols": False, "ncols": 100}
    return tqdm(iterable, disable=disable, **kwargs)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7.5 min``, ``3.2 h``, ``2.1 days``: a duration as people read an estimate."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def announce(what: str, n: int, unit: str, seconds_each: float, file: TextIO | None = None) -> float:
    """Print (to stderr) the estimate of a long job before it starts, ``what: 263 mutants x 22.1 s per mutant ~
    1.6 h`` (``unit`` singular); returns the estimated seconds."""
    total = n * seconds_each
    print(f"{what}: {n:,} {unit}{'s' if n != 1 else ''} x {seconds_each:.3g} s per {unit} ~ {format_seconds(total)}",
          file=file or sys.stderr, flush=True)
    return total


def progress_bar(refresh_rate: int = 20, every_seconds: float = LOG_EVERY_SECONDS) -> ProgressBar:
    """Lightning's tqdm bar when stdout (where it draws) is a terminal, else a plain line every ``every_seconds``
    (:class:`~.lightning.LogLineProgressBar`). Imports Lightning: call it where a command runs Lightning."""
    from proteinperformer.progress.lightning import progress_bar as lightning_progress_bar

    return lightning_progress_bar(refresh_rate, every_seconds)


def __getattr__(name: str) -> Any:
    """``progress.LogLineProgressBar`` and the other Lightning callbacks, imported on first use."""
    if name in ("LogLineProgressBar", "ItemProgressBar", "lightning_notices_silenced"):
        from proteinperformer.progress import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'proteinperformer.progress' has no attribute {name!r}")
