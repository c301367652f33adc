"""Helper of tests/test_ddp.py: validation on 2 CPU processes (gloo) where rank 1 has no supervised token.

    python tests/ddp_eval.py OUT_DIR

Run it in a subprocess (Lightning's DDP launcher re-executes this script for rank 1). Rank 0 validates on one
MLM batch with masked residues, rank 1 on a batch whose labels are all ignored; before the fix rank 1 skipped
the metric all-reduce that rank 0 entered, and the run hung. Writes OUT_DIR/rank{r}.json with the logged metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` importable when run as a script

from proteinperformer.data import IGNORE_INDEX, MLMCollator  # noqa: E402
from proteinperformer.training.lm import ProteinLM  # noqa: E402

TINY = {"dim": 32, "depth": 1, "heads": 2, "ff_dim": 64, "num_features": 16, "max_positions": 64}


def batches() -> tuple[dict, dict]:
    """(rank 0's batch with masked residues, rank 1's batch without any supervised token)."""
    g = torch.Generator().manual_seed(0)
    items = [{"tokens": torch.cat([torch.tensor([1]), torch.randint(5, 25, (n,), generator=g), torch.tensor([2])]),
              "seed": i} for i, n in enumerate((40, 25, 12))]
    from proteinperformer.tokenizer import Alphabet

    supervised = MLMCollator(Alphabet())(items)
    empty = {**supervised, "labels": torch.full_like(supervised["labels"], IGNORE_INDEX)}
    return supervised, empty


class RankData(pl.LightningDataModule):
    def val_dataloader(self):
        batch = batches()[self.trainer.global_rank]
        return torch.utils.data.DataLoader([batch], batch_size=None)


def model() -> ProteinLM:
    torch.manual_seed(0)
    return ProteinLM(TINY, task="mlm")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=out)
    metrics = trainer.validate(model(), datamodule=RankData(), verbose=False)[0]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
