"""Helper of tests/test_ddp.py: 2 DDP steps on 2 CPU processes (gloo), recording what each rank trained on.

    python tests/ddp_train.py OUT_DIR [PRECISION [OVERRIDE ...]]

Run it in a subprocess: Lightning's DDP launcher starts rank 1 by re-executing this script (inside pytest
it would re-launch pytest). Writes OUT_DIR/rank{r}.json with the rank's batches (CLM input ids, padding
stripped) and a checksum of its parameters after training; checkpoints and metrics.json as a normal run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` importable when run as a script

from proteinperformer.training.train import train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

DDP_OVERRIDES = [
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "task=clm",
    "data.max_sequences=200",
    "+callbacks.recorder._target_=tests.ddp_train.BatchRecorder",
]


class BatchRecorder(pl.Callback):
    """Record each training batch's sequences and the final parameter checksum to ``out_dir/rank{r}.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[list[list[int]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids, pad = batch["input_ids"].cpu(), batch["padding_mask"].cpu()
        self.batches.append([row[~mask].tolist() for row, mask in zip(ids, pad, strict=True)])

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches,
                  "param_checksum": checksum, "backend": str(getattr(trainer.strategy, "process_group_backend", ""))}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    precision = sys.argv[2] if len(sys.argv) > 2 else "32-true"
    train(tiny_config(out, [*DDP_OVERRIDES, f"trainer.precision={precision}", f"+callbacks.recorder.out_dir={out}",
                            *sys.argv[3:]]))
