"""Progress that suits where it is shown: a live bar on a terminal, one plain line now and then in a log file.

In a non-terminal log (SLURM, nohup, CI) a tqdm bar's carriage-return refreshes pile up into one ever-growing
line. :func:`track` (a tqdm for loops) and :func:`progress_bar` (Lightning's progress callback) turn into
periodic one-line updates there: every ``LOG_EVERY_SECONDS`` and at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
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


class LogLineProgressBar(ProgressBar):
    """Progress for log files (SLURM, nohup): one plain line every ``every_seconds`` and after each validation,
    ``step 1200/4000 (30%) epoch 0 | train/loss 2.812 val/ppl 16.93 | 0:05:12 elapsed``. A tqdm bar there would
    append one carriage-return refresh after another to a single ever-growing line."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self._enabled = True
        self._start = self._last = time.monotonic()
        self._last_step = -1

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        step = f"step {trainer.global_step}" + (f"/{total} ({100 * trainer.global_step / total:.0f}%)" if total else "")
        metrics = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num")
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start))
        return f"{step} epoch {trainer.current_epoch} | {metrics} | {elapsed} elapsed"

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            self._last = time.monotonic()
            self._last_step = trainer.global_step
            print(self._line(trainer, pl_module), file=sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.monotonic() - self._last >= self.every_seconds:
            self._emit(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._emit(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:  # the last validation already said where training ended
            self._emit(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        done = batch_idx + 1
        total = trainer.num_predict_batches[dataloader_idx]
        if self._enabled and trainer.is_global_zero and (time.monotonic() - self._last >= self.every_seconds
                                                         or done == total):
            self._last = time.monotonic()
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start))
            print(f"predict batch {done}/{total} | {elapsed} elapsed", file=sys.stdout, flush=True)


def progress_bar(refresh_rate: int = 20, every_seconds: float = 30.0) -> ProgressBar:
    """Lightning's tqdm bar when stdout (where it draws) is a terminal, else :class:`LogLineProgressBar` (disabled
    when ``PP_QUIET`` is set)."""
    if os.environ.get(QUIET_ENV):
        bar = LogLineProgressBar(every_seconds)
        bar.disable()
        return bar
    if sys.stdout.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LogLineProgressBar(every_seconds)
