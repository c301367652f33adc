"""Helper of tests/test_ddp.py: the FSDP wrapping of conf/trainer/fsdp.yaml, on 2 CPU processes (gloo).

    python tests/fsdp_cpu.py OUT_DIR

Lightning's FSDPStrategy refuses accelerator=cpu ("requires a GPU accelerator"), so this drives torch's
FullyShardedDataParallel directly with the config's sharding strategy and auto-wrap policy (one FSDP unit per
Performer Block): each rank trains a FAVOR+ model on its half of a batch for two AdamW steps, in float32 and
under CPU bf16 autocast. Rank 0 writes OUT_DIR/fsdp.json with the loss and the gathered (unsharded) parameters'
checksum of each run, which the test compares with the same two steps on one process over the whole batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402

from tests.test_train import _compose  # noqa: E402

CONFIG = dict(dim=32, depth=2, heads=2, ff_dim=64, num_features=16, max_positions=64, kernel="softmax")


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 24, (4, 40), generator=g)
    return tokens, torch.roll(tokens, -1, 1)


def train_steps(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, autocast: bool) -> float:
    """Two AdamW steps on (tokens, labels); returns the last loss (mean over this process's tokens)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
    return loss.item()


def new_model() -> torch.nn.Module:
    from proteinperformer.model import ModelConfig, PerformerLM

    torch.manual_seed(0)
    return PerformerLM(ModelConfig(**CONFIG))


def checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters (tied ones once)."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def run(rank: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FSDP_TEST_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    strategy = _compose(["trainer=fsdp"]).trainer.strategy
    policy = instantiate(strategy.auto_wrap_policy)
    tokens, labels = make_batch()
    mine = slice(2 * rank, 2 * rank + 2)
    record = {}
    for autocast in (False, True):
        sharding = ShardingStrategy[strategy.sharding_strategy]
        model = FSDP(new_model(), auto_wrap_policy=policy, sharding_strategy=sharding, device_id=torch.device("cpu"))
        loss = torch.tensor(train_steps(model, tokens[mine], labels[mine], autocast))
        dist.all_reduce(loss)
        with FSDP.summon_full_params(model, writeback=False):  # gather the shards
            total = checksum(model)
        record["bf16" if autocast else "fp32"] = {"loss": float(loss) / 2, "checksum": total,
                                                 "units": sum(isinstance(m, FSDP) for m in model.modules())}
    if rank == 0:
        Path(out, "fsdp.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
