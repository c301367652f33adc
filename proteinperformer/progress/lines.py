"""Progress of plain loops: a tqdm bar on a terminal, one plain line every ``LOG_EVERY_SECONDS`` in a log file
(:func:`track`), and the estimate of a long job before it starts (:func:`announce`). Imports only tqdm."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_EVERY_SECONDS = 30.0
QUIET_ENV = "PP_QUIET"  # set (to 1) by a command's --quiet: no bars and no periodic lines


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
    ``LOG_EVERY_SECONDS`` (and a last one when it ends) instead of redrawing in place; nothing when ``PP_QUIET``
    is set."""
    disable = disable or bool(os.environ.get(QUIET_ENV))
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
