"""What Lightning shows while it runs: progress callbacks for training and ``Trainer.predict``, and
:func:`lightning_notices_silenced` for what it prints besides (banners, tips, tables, third-party deprecations).

Imported only where a command runs Lightning (``pp-train``, ``pp-embed``): importing Lightning takes seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from proteinperformer.progress.lines import LOG_EVERY_SECONDS, QUIET_ENV, track

# the loggers Lightning's rank_zero_info goes through ("GPU available: ...", "TPU available: ...", the litlogger
# tip, "`Trainer(limit_val_batches=1)` was configured ...", the model summary)
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


@contextmanager
def lightning_notices_silenced(verbose: bool = False) -> Iterator[None]:
    """Within: Lightning's notices are not shown (scoped: the caller's warning filters and logger levels are
    restored on exit). Always: two warnings about this package's deliberate choices (``ProteinLM.
    on_before_batch_transfer`` counts tokens for any data module on purpose; a mid-epoch resume is exact here,
    the DataModule's state_dict holds the sampler position). Unless ``verbose`` (``pp-train verbose=true``,
    ``pp-embed --verbose``): Lightning's info lines (GPU/TPU available, the litlogger tip) and third-party
    ``DeprecationWarning`` / ``FutureWarning`` (this package's own stay). Lightning's warnings about the run
    itself (``PossibleUserWarning``, errors) are kept. Construct the Trainer inside: the banners come from its
    ``__init__``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `Lightning")
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        if verbose:
            yield
            return
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("default", category=category, module=r"proteinperformer\.")
        loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


class _SwitchableBar(ProgressBar):
    """The on/off switch Lightning asks of a progress bar (``enable``/``disable``/``is_enabled``)."""

    _enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True


class LogLineProgressBar(_SwitchableBar):
    """Training progress for log files (SLURM, nohup): one plain line every ``every_seconds`` and after each
    validation, ``step 1200/4000 (30%) epoch 0 | train/loss 2.812 val/ppl 16.93 | 0:05:12 elapsed``. A tqdm bar
    there would append one carriage-return refresh after another to a single ever-growing line."""

    def __init__(self, every_seconds: float = LOG_EVERY_SECONDS) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self._enabled = True
        self._start = self._last = time.monotonic()
        self._last_step = -1

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


class ItemProgressBar(_SwitchableBar):
    """``Trainer.predict`` progress counted in items of each batch (``len(batch)``: sequences) against a total
    known before it starts: :func:`~proteinperformer.progress.track` on global rank zero, so a bar on a terminal
    and a line every ``LOG_EVERY_SECONDS`` in a log (``embedding: 40%|... 4000/10000 [01:10<01:45, 57 seq/s]``).
    A streamed predict dataloader has no length, so Lightning's own bar would show ``0/?`` and never move. With
    several processes rank zero counts its own batches times the world size (an estimate; it ends at the total)."""

    def __init__(self, total: int, desc: str = "embedding", unit: str = "seq") -> None:
        super().__init__()
        self.total, self.desc, self.unit = total, desc, unit
        self._enabled = True
        self._bar = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            self._bar = track(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._bar is not None:
            self._bar.update(min(len(batch) * trainer.world_size, self.total - self._bar.n))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.update(self.total - self._bar.n)
            self._bar.close()
            self._bar = None


def progress_bar(refresh_rate: int = 20, every_seconds: float = LOG_EVERY_SECONDS) -> ProgressBar:
    """Lightning's tqdm bar when stdout (where it draws) is a terminal, else :class:`LogLineProgressBar` (disabled
    when ``PP_QUIET`` is set)."""
    if os.environ.get(QUIET_ENV):
        bar = LogLineProgressBar(every_seconds)
        bar.disable()
        return bar
    if sys.stdout.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LogLineProgressBar(every_seconds)
