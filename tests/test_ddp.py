"""DDP on CPU: two ranks train on disjoint data, stay in sync, and write a checkpoint that loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proteinperformer.training.lm import ProteinLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_ddp_two_cpu_ranks_see_disjoint_data(tmp_path: Path, precision: str) -> None:
    """Also under bf16-mixed, the precision of trainer=ddp on GPUs (its CPU twin: gloo + CPU autocast)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_train.py"), str(tmp_path), precision], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    seen = [{tuple(seq) for batch in r["batches"] for seq in batch} for r in ranks]
    assert [len(r["batches"]) for r in ranks] == [2, 2]
    assert all(len(s) == 2 * 8 for s in seen), "each rank trains on 2 batches of 8 distinct sequences"
    assert not seen[0] & seen[1], "ranks must train on disjoint shards"
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"], "DDP keeps the replicas identical"

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    ckpt = Path(metrics["last_checkpoint"])
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    lm = ProteinLM.load_from_checkpoint(ckpt, map_location="cpu")
    checksum = float(sum(p.detach().double().sum() for p in lm.parameters()))
    assert abs(checksum - ranks[0]["param_checksum"]) < 1e-6
    tokens = torch.tensor([[1, 10, 11, 12]])
    assert lm.model(tokens)["logits"].shape == (1, 4, lm.model.config.vocab_size)


def test_fsdp_config_shards_and_trains_like_one_process(tmp_path: Path) -> None:
    """trainer=fsdp's wrapping (FULL_SHARD, one unit per Block) on 2 gloo ranks equals one unsharded process.

    Lightning's FSDPStrategy refuses the CPU, so tests/fsdp_cpu.py drives torch FSDP with the config's sharding
    strategy and auto-wrap policy; what only a GPU run shows (NCCL, Lightning's FSDP plugin) is in gpu_check."""
    from tests.fsdp_cpu import checksum, make_batch, new_model, train_steps

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_cpu.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "fsdp.json").read_text())
    tokens, labels = make_batch()
    for run, autocast in (("fp32", False), ("bf16", True)):
        model = new_model()
        loss = train_steps(model, tokens, labels, autocast)
        assert record[run]["units"] == 1 + model.config.depth  # the root + one per Block
        tol = 1e-5 if run == "fp32" else 2e-2
        assert record[run]["loss"] == pytest.approx(loss, rel=tol)
        assert record[run]["checksum"] == pytest.approx(checksum(model), rel=tol)


def test_validation_with_a_rank_without_targets_neither_hangs_nor_skews(tmp_path: Path) -> None:
    """2 gloo ranks, rank 1 without any supervised token: both ranks finish and log the metrics of rank 0's batch
    (the global sums), as one process validating rank 0's batch alone does."""
    from tests.ddp_eval import batches, model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_eval.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and {"val/ppl", "val/acc", "val/loss"} <= set(ranks[0])

    lm = model().eval()
    with torch.no_grad():
        out = lm.model_step(batches()[0])
    n = float(out["n_residue"])
    assert n > 0
    assert abs(ranks[0]["val/ppl"] - math.exp(float(out["residue_nll"]) / n)) < 1e-4 * ranks[0]["val/ppl"]
    assert abs(ranks[0]["val/acc"] - float(out["residue_correct"]) / n) < 1e-6
