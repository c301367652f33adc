"""Training callbacks: FAVOR+ feature redraw, throughput (non-pad tokens/s, peak GPU memory), per-batch RNG
seeding, a periodic ModelCheckpoint whose ``last.ckpt`` is always the state at the end of training (also after a
SIGTERM), and the divergence stop (the progress display is :func:`proteinperformer.progress.progress_bar`).

They are Lightning callbacks, configured in ``conf/callbacks/default.yaml`` next to Lightning's own
(ModelCheckpoint, LearningRateMonitor, progress bar).
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from proteinperformer.attention import redraw_projections
from proteinperformer.data.datasets import example_seed


class FeatureRedrawCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, redraw the projection of each FAVOR+ attention layer.

    Default every 1000 steps (performer-pytorch's default): frequent enough that the model never depends on
    one draw, rare enough that the optimiser is not fighting fresh noise at every step. The draw for step s
    is a function of (seed, s) (:func:`proteinperformer.attention.redraw_projections`), so DDP ranks agree
    and a resumed run redraws as the straight one.

    Args:
        every_n_steps: redraw interval in optimizer steps (trainer.global_step); <= 0 disables.
        seed: base seed.
    """

    def __init__(self, every_n_steps: int = 1000, seed: int = 0):
        super().__init__()
        self.every_n_steps, self.seed = every_n_steps, seed
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches share a global_step: redraw once per step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            for name, buf in pl_module.named_buffers():  # FAVOR++ statistics: every rank folds the same sums
                if name.endswith(("pending_moments", "pending_pairs")):
                    buf.copy_(trainer.strategy.reduce(buf, reduce_op="sum"))
            redraw_projections(pl_module, self.seed, step)
            self._last_step = step


class StepSeedCallback(pl.Callback):
    """Seed torch's global RNG before every training batch from ``(seed, rank, batch index)``.

    Dropout draws from the global RNG, whose state a checkpoint does not hold; re-seeding per batch makes
    the masks a pure function of the position in training, so a run resumed from a mid-epoch checkpoint
    draws exactly the masks the uninterrupted run drew (and DDP ranks draw different ones). The batch
    index is Lightning's ``total_batch_idx``, which is restored from the checkpoint.

    Args:
        seed: base seed (the run's ``seed``).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        batch_index = trainer.fit_loop.epoch_loop.total_batch_idx
        torch.manual_seed(example_seed(self.seed, trainer.global_rank, batch_index))


class ThroughputCallback(pl.Callback):
    """Log training throughput in non-padding tokens per second (and peak GPU memory on CUDA).

    The time of a window of ``log_every_n_steps`` batches is measured from one train-batch start to the
    next, so it includes data loading, forward, backward and the optimizer step. Logged keys:
    ``perf/tokens_per_sec`` (this device), ``perf/tokens_per_sec_total`` (× world size, assuming equal
    shards) and on CUDA ``perf/max_memory_gib`` (``torch.cuda.max_memory_allocated`` of this device).

    Args:
        log_every_n_steps: batches per measurement window.
    """

    def __init__(self, log_every_n_steps: int = 20) -> None:
        super().__init__()
        self.log_every_n_steps = log_every_n_steps
        self._tokens = 0
        self._batches = 0
        self._start: float | None = None
        self.last_metrics: dict[str, float] = {}

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> int:
        """Number of non-padding input tokens in a collated batch: ``num_tokens``, counted on the host before the
        batch went to the device (``ProteinLM.on_before_batch_transfer``), else from ``padding_mask`` [B, T]."""
        if "num_tokens" in batch:
            return batch["num_tokens"]
        return int((~batch["padding_mask"]).sum())

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start = self._now(pl_module.device)
            self._tokens = self._batches = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._tokens += self.count_tokens(batch)
        self._batches += 1
        if self._batches < self.log_every_n_steps or self._start is None:
            return
        seconds = self._now(pl_module.device) - self._start
        rate = self._tokens / max(seconds, 1e-9)
        metrics = {"perf/tokens_per_sec": rate, "perf/tokens_per_sec_total": rate * trainer.world_size}
        if pl_module.device.type == "cuda":
            metrics["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if trainer.is_global_zero:  # straight to the loggers, so windows need not align with log_every_n_steps
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self.last_metrics = metrics
        self._start = None


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes ``last.ckpt`` when training stops between two saves.

    With ``save_last=True`` Lightning refreshes ``last.ckpt`` only together with a regular save, so a run
    stopped by ``max_time`` (or whose ``max_steps`` is not a multiple of ``every_n_train_steps``) left
    ``last.ckpt`` at the previous save, and resuming from it repeated up to N steps of work. Here the batch
    that ends training also saves ``last.ckpt``, from ``on_train_batch_end`` like the periodic saves: a
    checkpoint written later (``on_train_end``) records the epoch as finished, and a resumed run would start
    a new epoch instead of continuing this one. A SIGTERM (Lightning stops after the current batch) saves
    ``last.ckpt`` the same way, so a preempted run resumes from it. Arguments are ModelCheckpoint's.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Timer (max_time) sets should_stop in its on_train_batch_end, which Lightning runs before any
        # ModelCheckpoint's; max_steps is reached when this step is the last one.
        # A SIGTERM (SLURM preemption, kill) is noted by Lightning's signal handler, which ends training after
        # this batch: save here, at the point where periodic saves resume exactly.
        if trainer.should_stop or trainer.received_sigterm or 0 <= trainer.max_steps <= trainer.global_step:
            self._save_last_if_new(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_new(trainer)  # any other way out (e.g. the epoch limit)

    def _save_last_if_new(self, trainer: pl.Trainer) -> None:
        # the private names are the ones ModelCheckpoint's own on_train_end / on_exception use
        if self.save_last and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step


class TrainingDiverged(ValueError):
    """The loss or the gradient norm is not finite (one line: the step and what to try)."""


class DivergenceStop(pl.Callback):
    """Stop training at the first non-finite loss or gradient norm, and never save non-finite weights.

    The loss and the gradient norm are read on the host only at logging steps (every
    ``trainer.log_every_n_steps``, when Lightning reads the logged values anyway), so there is no extra device
    sync per step; the first non-finite value seen raises :class:`TrainingDiverged` naming the step and what to
    try. Every checkpoint save first checks that the weights are finite (one sync per save): a diverged model
    is never written, so ``last.ckpt`` and every kept checkpoint stay the last good state. Under ``16-mixed`` the
    gradient norm is not checked: the GradScaler skips steps with inf gradients itself (the loss still is).

    Args:
        max_skipped_steps: 0 (default) stops at the first non-finite value. N > 0 checks the gradient norm at
            every step (one host read per step) and skips up to N steps whose gradients are not finite (no
            optimizer update: their gradients are dropped), then stops; for bf16/fp16 runs with rare overflows.
    """

    def __init__(self, max_skipped_steps: int = 0) -> None:
        super().__init__()
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0
        self._grad_norm: torch.Tensor | None = None

    @staticmethod
    def _logging_step(trainer: pl.Trainer, step: int) -> bool:
        return trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        step = trainer.global_step + 1  # the step this update makes
        if str(trainer.precision) == "16-mixed":  # fp16's GradScaler skips steps with inf gradients by design
            return
        if not (self.max_skipped_steps > 0 or self._logging_step(trainer, step)):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if self.max_skipped_steps <= 0:
            self._grad_norm = norm  # read at this step's on_train_batch_end (a logging step)
            return
        if not bool(torch.isfinite(norm)):  # the per-step host read that skipping needs
            self.skipped += 1
            if self.skipped > self.max_skipped_steps:
                self._fail(trainer, pl_module, f"the gradient norm is {float(norm)} at step {step} "
                           f"({self.skipped - 1} non-finite steps skipped before)")
            for p in pl_module.parameters():  # AdamW leaves a parameter without a gradient untouched
                p.grad = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self._logging_step(trainer, step):
            return
        # Under DDP only the all-reduced gradient norm decides (the same on every rank, so all ranks stop at the same
        # step; a rank's own loss could stop it alone and hang the others): a NaN loss on any rank makes it NaN.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if trainer.world_size == 1 and loss is not None and not math.isfinite(float(loss)):
            self._fail(trainer, pl_module, f"the loss is {float(loss)} at step {step}")
        norm, self._grad_norm = self._grad_norm, None
        if norm is not None and not math.isfinite(float(norm)):
            self._fail(trainer, pl_module, f"the gradient norm is {float(norm)} at step {step}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        weights = [t for t in checkpoint.get("state_dict", {}).values() if torch.is_tensor(t) and t.is_floating_point()]
        if weights and not bool(torch.stack([torch.isfinite(t).all() for t in weights]).all()):
            self._fail(trainer, pl_module, f"the weights are not finite at step {trainer.global_step} (found when "
                       "saving a checkpoint, which was not written)")

    def _fail(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        kept = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "")
        hp = pl_module.hparams
        precision = str(trainer.precision)
        then = (f"kept: {kept}; resume from it with ckpt_path={kept} and the change" if kept
                else "no checkpoint was saved yet; rerun with the change")
        raise TrainingDiverged(
            f"training diverged: {what} (checked every trainer.log_every_n_steps={trainer.log_every_n_steps} "
            f"steps); {then}. Try a lower model.lr (now {hp.get('lr')}), a smaller trainer.gradient_clip_val "
            f"(now {trainer.gradient_clip_val})"
            + (f", trainer.precision=32-true instead of {precision}" if precision != "32-true" else "")
            + ", or callbacks.divergence.max_skipped_steps=N to skip up to N non-finite steps"
        )
