"""Resuming a killed run reproduces the uninterrupted run step for step.

Run A trains 20 steps straight. Run B is the same run killed at step 10, right after its periodic
checkpoint (``every_n_train_steps=10``), then resumed with a new Trainer from that checkpoint to step 20.
The per-step training losses of steps 11-20 must agree to 1e-6: that needs the same data order (the
DataModule's sampler position in the checkpoint, mid-epoch, and across the following epoch boundary),
the same dropout masks (``StepSeedCallback``), the same FAVOR+ projection redraws (every 4 steps here)
and the same optimizer and LR-schedule state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl

from proteinperformer.training.train import train
from tests.conftest import tiny_config

RESUME_OVERRIDES = [
    "data.max_sequences=150",  # ~15 train batches per epoch: steps 11-20 cross an epoch boundary
    "model.config.dropout=0.1",
    "trainer.max_steps=20",
    "trainer.val_check_interval=15",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=5",
    "callbacks.periodic_checkpoint.every_n_train_steps=10",
    "callbacks.feature_redraw.every_n_steps=4",
    "model.config.use_projection=true",  # a projection to redraw (the ReLU default has none)
]


class LossRecorder(pl.Callback):
    """Append ``{"step": global_step, "loss": training loss}`` per optimizer step to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(pl.Callback):
    """Raise when the batch after optimizer step ``step`` starts (the step's checkpoint is already on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"killed at step {self.step}")


def _run(out: Path, record: Path, extra: list[str] = ()) -> dict:
    recorder = [f"+callbacks.recorder._target_={__name__}.LossRecorder", f"+callbacks.recorder.path={record}"]
    return train(tiny_config(out, [*RESUME_OVERRIDES, *recorder, *extra]))


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


# packed: 18 train proteins (96-token windows) in 15 streams of <= 896 tokens per epoch (data/packing.py), so that
# steps 11-20 cross an epoch boundary as in the other cases (max_sequences=50 with 1,280 tokens made 21 streams)
PACKED = ["data.packing=true", "data.max_sequences=20", "data.toks_per_batch=896"]


@pytest.mark.parametrize(("batching", "precision"),
                         [(["data.bucketing=false"], "32-true"), (["data.bucketing=true"], "32-true"),
                          (["data.bucketing=false"], "bf16-mixed"), (PACKED, "32-true")],
                         ids=["random-batches", "length-bucketed", "bf16-mixed", "packed"])
def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path: Path, batching: list[str], precision: str) -> None:
    """Also under bf16-mixed (the GPU default), whose checkpoint holds float32 weights and the same state."""
    data = [*batching, "data.pool_batches=4", f"trainer.precision={precision}"]
    _run(tmp_path / "a", tmp_path / "a.jsonl", data)
    crash = [f"+callbacks.crash._target_={__name__}.CrashAtStep", "+callbacks.crash.step=10"]
    with pytest.raises(SimulatedCrash):
        _run(tmp_path / "b", tmp_path / "b1.jsonl", [*data, *crash])
    checkpoint = tmp_path / "b" / "checkpoints" / "step10.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in (tmp_path / "b").rglob("*.ckpt"))
    metrics = _run(tmp_path / "b", tmp_path / "b2.jsonl", [*data, f"ckpt_path={checkpoint}"])

    straight, before, resumed = (_losses(tmp_path / f"{n}.jsonl") for n in ("a", "b1", "b2"))
    assert sorted(straight) == list(range(1, 21)) and sorted(before) == list(range(1, 11))
    assert sorted(resumed) == list(range(11, 21)), "the resumed run must continue at step 11 and stop at 20"
    assert metrics["global_step"] == 20
    for step in range(1, 11):
        assert before[step] == pytest.approx(straight[step], abs=1e-6), f"step {step} before the crash"
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step} after resuming"
    # the run is not trivially constant: losses change from step to step
    assert len({round(v, 6) for v in straight.values()}) > 15


class StopAtStep(pl.Callback):
    """Ask the trainer to stop after optimizer step ``step``, as Lightning's Timer does for ``max_time``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_run_stopped_between_checkpoints_resumes_from_last_ckpt(tmp_path: Path) -> None:
    """A run stopped at step 7 (max_time-like, between the periodic saves at 0 and 10) leaves last.ckpt at
    step 7, and resuming from it continues the same epoch: steps 8-20 equal the straight run."""
    _run(tmp_path / "a", tmp_path / "a.jsonl")
    stop = [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=7"]
    first = _run(tmp_path / "b", tmp_path / "b1.jsonl", stop)
    assert first["global_step"] == 7 and first["last_checkpoint"].endswith("last.ckpt")
    _run(tmp_path / "b", tmp_path / "b2.jsonl", [f"ckpt_path={first['last_checkpoint']}"])
    straight, resumed = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b2.jsonl")
    assert sorted(resumed) == list(range(8, 21))
    for step in range(8, 21):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step} after resuming"
