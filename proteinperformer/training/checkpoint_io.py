"""Lightning's checkpoint writer, made atomic: a checkpoint is written to a temp file beside its name and renamed.

Lightning's ``TorchCheckpointIO`` writes straight to the final name, so a full disk (or a kill) mid-write leaves a
truncated ``step1000.ckpt`` / ``last.ckpt`` that looks complete, over the good one. Here the old file stays until
the new one is whole, and a full disk or an unwritable folder ends in one line naming the file
(:func:`proteinperformer.files.write_atomic`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from proteinperformer.files import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` writes through a temp file + rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
