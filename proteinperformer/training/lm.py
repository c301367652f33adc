"""LightningModule for masked (MLM) and autoregressive (CLM) protein language modelling.

Holds only training concerns: the loss, accuracy and perplexity on the predicted residues, the
optimiser (AdamW with linear warmup and cosine decay) and checkpoint metadata. The network itself is
``proteinperformer.model.PerformerLM``; loops, devices, precision, clipping and logging are Lightning's.

Metrics: ``loss`` is the cross-entropy over all supervised targets (for CLM this includes ``<eos>``, so
the model learns where proteins end); under DDP the loss optimised is the mean over all supervised tokens of
the global step (:func:`global_token_mean`), the logged ``train/loss`` this rank's mean. ``acc`` and ``ppl`` are
computed over residue targets only (masked residues for MLM, next residues for CLM), the quantity the paper's
Table 2 and the unigram baseline report; both are defined once, in :mod:`proteinperformer.training.scoring` and
:mod:`proteinperformer.data.unigram`.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torchmetrics import SumMetric

from proteinperformer.data.unigram import unigram_baseline
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet
from proteinperformer.training.scoring import SUMS, batch_sums, residue_table, summarise

TASKS = ("mlm", "clm")


def global_token_mean(loss: torch.Tensor, n_supervised: torch.Tensor, world: int, reduce=None) -> torch.Tensor:
    """This rank's share of the mean NLL over all supervised tokens of a step on ``world`` ranks.

    ``loss``: this rank's mean over its ``n_supervised`` tokens; ``reduce(tensor, reduce_op="sum")`` sums over
    ranks (``trainer.strategy.reduce``: one scalar all-reduce on device, no host read). DDP averages gradients
    over ranks, so the mean of per-rank means would weigh a token of a short batch up to ~10x more than one of
    a long batch. Returned: ``nll_sum * world / n_global``, whose DDP average is ``sum over ranks of nll_sum /
    n_global``. With gradient accumulation the micro-batches' global means are averaged, as Lightning does.
    """
    if world == 1:
        return loss
    n_global = reduce(n_supervised.detach().float(), reduce_op="sum")
    return loss * n_supervised * world / n_global


class ProteinLM(pl.LightningModule):
    """Train a :class:`PerformerLM` on MLM or CLM batches from the collators in ``proteinperformer.data``."""

    def __init__(
        self,
        config: dict | ModelConfig | None = None,
        task: str = "mlm",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(**dict(config or {}))
        if cfg.causal != (task == "clm"):
            raise ValueError(f"task={task!r} needs model causal={task == 'clm'}, got causal={cfg.causal}")
        self.save_hyperparameters({"config": cfg.to_dict(), "task": task, "lr": lr, "weight_decay": weight_decay,
                                   "betas": tuple(betas), "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                   "compile": compile})
        self.model = PerformerLM(cfg)
        if compile:
            # In place (nn.Module.compile): state-dict keys stay "model.…", so checkpoints load either way.
            # FAVOR+'s autograd Functions trace as they are and the forward reads nothing back from the device,
            # so it compiles to one graph (tests/test_host_reads.py compiles it with fullgraph=True).
            self.model.compile()
        self.task = task
        self.alphabet = Alphabet(cfg.alphabet)
        self.register_buffer("is_residue_id", residue_table(self.alphabet, cfg.vocab_size), persistent=False)
        # Evaluation sums (synchronised across DDP ranks by torchmetrics at compute): NLL of all supervised targets,
        # their count, residue NLL, residue hits, residue count. Sums, not MeanMetric: with nan_strategy="disable"
        # torchmetrics 1.9's MeanMetric replaces the weights by ones (an unweighted mean of batch means). NaN is
        # kept (not dropped): a diverged run then logs val/ppl = nan instead of logging nothing, which made
        # ModelCheckpoint(monitor="val/ppl") fail with "could not find the monitored key".
        self.eval_sums = torch.nn.ModuleDict({name: SumMetric(nan_strategy="disable") for name in SUMS})
        for metric in self.eval_sums.values():
            metric.set_dtype(torch.float64)  # counts stay exact beyond 2^24 tokens
        # split -> its unigram baseline, kept while one Trainer call runs (teardown)
        self._unigram: dict[str, dict] = {}

    # ---- one step shared by train / val / test -------------------------------------------------
    def model_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward a collated batch: :func:`~proteinperformer.training.scoring.batch_sums` of its targets, and
        ``loss``, the mean NLL of all supervised targets."""
        # packed batches (data.packing) carry cu_seqlens: (1, T) streams of proteins, each attended alone
        logits = self.model(batch["input_ids"], batch["padding_mask"], cu_seqlens=batch.get("cu_seqlens"))["logits"]
        out = batch_sums(logits, batch["labels"], self.is_residue_id)
        return {**out, "loss": out["nll"] / out["n_supervised"].clamp_min(1)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model_step(batch)
        n = out["n_residue"].clamp_min(1)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/acc", out["residue_correct"] / n)
        self.log("train/ppl", torch.exp(out["residue_nll"] / n))
        world = self.trainer.world_size if self._trainer is not None else 1
        return global_token_mean(out["loss"], out["n_supervised"].clamp_min(1), world,
                                 self.trainer.strategy.reduce if world > 1 else None)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        # Accumulate sums on the device, every batch (a batch with no target adds zeros): no host read per step.
        out = self.model_step(batch)
        for name, metric in self.eval_sums.items():
            metric.update(out[name])

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, split: str) -> None:
        # Every rank computes (all-reduces) every sum before anything is decided, so the decision below is the
        # same on all ranks: deciding on a local count would let a rank without targets skip the collective
        # its peers enter, and hang DDP.
        totals = {name: metric.compute() for name, metric in self.eval_sums.items()}
        for metric in self.eval_sums.values():
            metric.reset()
        if totals["n_residue"] == 0:  # no residue target on any rank: nothing to report
            return
        scores = summarise(totals)
        self.log(f"{split}/loss", scores["loss"])
        self.log(f"{split}/ppl", scores["perplexity"], prog_bar=True)
        self.log(f"{split}/acc", scores["accuracy"], prog_bar=True)
        baseline = self._unigram_baseline({"val": "valid", "test": "test"}[split])
        if baseline is not None:
            self.log(f"{split}/baseline_acc", baseline["accuracy"])
            self.log(f"{split}/baseline_ppl", baseline["perplexity"])

    def _unigram_baseline(self, split: str) -> dict | None:
        """The unigram baseline of ``split`` (:func:`~proteinperformer.data.unigram.unigram_baseline`: train-split
        frequencies, every residue of ``split``) when the data module has ``splits``, else None; computed once
        per data module and Trainer call."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        splits = getattr(datamodule, "splits", None)
        if not splits or "train" not in splits or split not in splits:
            return None
        if split not in self._unigram:
            alphabet = getattr(datamodule, "alphabet", self.alphabet)
            self._unigram[split] = unigram_baseline(splits["train"], splits[split], alphabet)
        return self._unigram[split]

    def teardown(self, stage: str) -> None:
        self._unigram.clear()  # no reference to the data outlives the fit / validate / test call

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Count the non-padding tokens while the batch is still on the host, so the throughput callback never
        # reads the device (a sync per step on a GPU).
        if isinstance(batch, dict) and "padding_mask" in batch:
            batch["num_tokens"] = int((~batch["padding_mask"]).sum())
        return batch

    # ---- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW (decay on matrices only, as nanoGPT) + linear warmup, cosine decay to min_lr_ratio·lr."""
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self.trainer else 1
        warmup = min(hp.warmup_steps, max(total // 10, 1)) if total > 1 else 0

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Carry the vocabulary with the weights so a checkpoint can be used without this repo's configs.
        checkpoint["alphabet"] = list(self.alphabet.all_toks)

