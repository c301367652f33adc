"""Periodic redraw of the FAVOR+ random features during training (Choromanski et al. 2021, §4; the
reference google-research/performer redraws during training, performer-pytorch every 1000 calls).

Redrawing keeps the model from overfitting one particular draw of ω. Default every 1000 optimizer steps
(performer-pytorch's default): frequent enough that the model never depends on one draw, rare enough that
the optimiser is not fighting fresh noise at every step. Draws are seeded from (seed, global_step), so every
DDP rank draws the same matrices without communication and a resumed run redraws exactly as the original.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from .module import MultiheadSelfAttention


class FeatureRedrawCallback(pl.Callback):
    """Every `every_n_steps` optimizer steps, redraw the projection of each MultiheadSelfAttention.

    Args:
        every_n_steps: redraw interval in optimizer steps (trainer.global_step); <= 0 disables.
        seed: base seed; the generator for step s is seeded with (seed, s).
    """

    def __init__(self, every_n_steps: int = 1000, seed: int = 0):
        super().__init__()
        self.every_n_steps, self.seed = every_n_steps, seed
        self._last_step = -1

    @staticmethod
    def redraw(module: torch.nn.Module, seed: int, step: int) -> int:
        """Redraw every FAVOR projection in `module` deterministically from (seed, step); returns how many."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        n = 0
        for layer in module.modules():
            if isinstance(layer, MultiheadSelfAttention) and layer.projection is not None:
                layer.redraw_projection(gen)  # layers draw in module order from one stream: distinct per layer
                n += 1
        return n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches share a global_step: redraw once per step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.redraw(pl_module, self.seed, step)
            self._last_step = step
