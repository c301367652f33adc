"""Progress that suits where it is shown: a live bar on a terminal, one plain line now and then in a log file.

In a non-terminal log (SLURM, nohup, CI) a tqdm bar's carriage-return refreshes pile up into one ever-growing
line. :func:`track` (a tqdm for loops) and the Lightning callbacks of :mod:`.lightning` (:func:`progress_bar`
for training, :class:`~.lightning.ItemProgressBar` for ``Trainer.predict``) turn into periodic one-line updates
there: every ``LOG_EVERY_SECONDS`` and at the end. :func:`announce` states a long job's estimate before it starts.

:mod:`.lines` (``track``, ``announce``) imports only tqdm, so ``import proteinperformer.progress`` stays fast; the
Lightning callbacks and :func:`~.lightning.lightning_notices_silenced` (what Lightning prints, off unless
``verbose``) are in :mod:`.lightning`, imported where a command runs Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proteinperformer.progress.lines import LOG_EVERY_SECONDS, announce, format_seconds, track

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import ProgressBar

__all__ = ["LOG_EVERY_SECONDS", "announce", "format_seconds", "progress_bar", "track"]


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
