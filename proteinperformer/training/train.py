"""Training from a composed Hydra config: instantiate data/model/callbacks/loggers/trainer, fit, score.

No training logic lives here (that is :class:`~proteinperformer.training.lm.ProteinLM` and Lightning); this only
wires the pieces and writes ``metrics.json`` next to the checkpoints. The command-line entry (``pp-train`` /
``scripts/train.py``) is :mod:`proteinperformer.cli.train`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from proteinperformer.checkpoints import load_model, read_torch
from proteinperformer.data.sources import FastaSource
from proteinperformer.data.unigram import unigram_description
from proteinperformer.files import WriteError, resolve_path, write_json_atomic
from proteinperformer.progress.lightning import lightning_notices_silenced
from proteinperformer.training.checkpoint_io import AtomicCheckpointIO
from proteinperformer.training.lm import ProteinLM
from proteinperformer.training.precision import check_trainer
from proteinperformer.training.resume import resumed_config, save_run_config

log = logging.getLogger("proteinperformer.training.train")


def _instantiate_all(group: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c, _convert_="all") for c in (group or {}).values() if c is not None]


def _init_weights_from(cfg: DictConfig):
    """``init_from=PATH``: the network of PATH (any file ``load_model`` reads), with cfg.model.config
    replaced by its config (so the data module tokenises with its alphabet); None when init_from is unset."""
    if not cfg.get("init_from"):
        return None
    net = load_model(resolve_path(cfg.init_from))
    with open_dict(cfg):
        cfg.model.config = net.config.to_dict()
    log.info("init_from %s: weights and model.config from the checkpoint", cfg.init_from)
    return net


def _instantiate_data(cfg: DictConfig):
    """The data module of ``cfg.data``; a FASTA that is not there fails here, in one line that names the setting
    (the default sample is a relative path, present only when run from the checkout's root). A data setting that
    its part refuses (ValueError: e.g. data.packing=true with data.mode=concat) is raised as itself, not inside
    Hydra's InstantiationException, so pp-train prints its one line."""
    try:
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    except InstantiationException as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise
    examples = getattr(datamodule, "examples", None)
    positions = (cfg.get("model") or {}).get("config", {}).get("positions", "learned")
    if getattr(examples, "packing", False) and examples.max_len is None and positions == "learned":
        raise ValueError("data.packing=true with data.max_len=null packs whole proteins of any length, which learned "
                         "positions (model.config.max_positions) cannot take: set data.max_len or "
                         "model.config.positions=rotary")
    source = getattr(datamodule, "source", None)
    if isinstance(source, FastaSource) and not resolve_path(source.path).exists():
        raise ValueError(f"{source.path}: no such file (a relative path is read from {Path.cwd()}); set "
                         "data.fasta_path=PATH to your sequences (.fasta or .fasta.gz)")
    return datamodule


def _instantiate_model(cfg: DictConfig, net):
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    if net is not None:
        model.model.load_state_dict(net.state_dict(), strict=True)
    return model


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Validation accuracy/perplexity of ``cfg.init_from`` as it is (no training), with the config's data."""
    pl.seed_everything(cfg.seed, workers=True)
    net = _init_weights_from(cfg)
    datamodule = _instantiate_data(cfg)
    model = _instantiate_model(cfg, net)
    with lightning_notices_silenced(cfg.get("verbose", False)):
        trainer = pl.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=cfg.get("verbose", False),
                             limit_val_batches=cfg.trainer.get("limit_val_batches"))
        final = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {"val_acc": final.get("val/acc"), "val_ppl": final.get("val/ppl"),
            "baseline_acc": final.get("val/baseline_acc"), "baseline_ppl": final.get("val/baseline_ppl")}


def score_checkpoint(ckpt: str | Path, task: str, datamodule, limit_val_batches=1.0,
                     limit_test_batches=None) -> dict[str, float]:
    """Validation (and, given ``limit_test_batches``, test) accuracy / perplexity of a checkpoint's weights
    (loaded without pickle) on a set-up DataModule; used to score several runs on one data load."""
    net = load_model(Path(ckpt))
    model = ProteinLM(task=task, config=net.config.to_dict())
    model.model.load_state_dict(net.state_dict(), strict=True)
    with lightning_notices_silenced():
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=limit_val_batches, limit_test_batches=limit_test_batches or 1.0)
        val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    out = {"val_acc": val["val/acc"], "val_ppl": val["val/ppl"], "baseline_acc": val["val/baseline_acc"],
           "baseline_ppl": val["val/baseline_ppl"]}
    if limit_test_batches:
        with lightning_notices_silenced():
            test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        out.update({"test_acc": test["test/acc"], "test_ppl": test["test/ppl"]})
    return out


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(precision: str | None) -> None:
    """``trainer.matmul_precision`` -> ``torch.set_float32_matmul_precision`` (None leaves torch's setting).

    "high" lets float32 matmuls use TF32 tensor cores on Ampere/Hopper (10-bit mantissa inputs, fp32 accumulation):
    FAVOR+'s float32 region (attention/favor.py) runs its matmuls under this setting too. The GPU presets use
    "high"; the CPU default "highest" (plain fp32). studies/tf32_favor_error/ measures TF32's effect on FAVOR+'s error.
    """
    if precision is None:
        return
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"trainer.matmul_precision={precision!r}: expected one of {MATMUL_PRECISIONS}")
    torch.set_float32_matmul_precision(precision)


def _last_checkpoint(trainer: pl.Trainer) -> str:
    """The ``last.ckpt`` a checkpoint callback wrote (or restored), else the newest periodic checkpoint (when
    ``last.ckpt`` itself could not be written); only files on disk; "" when none."""
    callbacks = trainer.checkpoint_callbacks
    candidates = [c.last_model_path for c in callbacks] + [c.best_model_path for c in callbacks if c.monitor == "step"]
    return next((p for p in candidates if p and Path(p).is_file()), "")


def _fit(trainer: pl.Trainer, model: ProteinLM, datamodule, ckpt_path: str | None) -> None:
    """``trainer.fit``; a SIGTERM (preemption) ends in one line naming the saved ``last.ckpt`` (PeriodicCheckpoint
    saved it after the last finished batch), a full disk in one line naming the file and the checkpoint to resume
    from."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        last = _last_checkpoint(trainer)
        raise SystemExit(f"stopped by SIGTERM at step {trainer.global_step}; saved {last or 'no checkpoint'}; "
                         f"resume with ckpt_path={last or 'PATH'}") from None
    except WriteError as err:
        last = _last_checkpoint(trainer)
        then = f"resume with ckpt_path={last}" if last else "rerun the same command"
        raise WriteError(f"{str(err).split(';')[0]}; nothing was written under that name; free space and {then}",
                         err.errno) from err


def train(cfg: DictConfig) -> dict:
    """Fit a model from a composed config; returns the final metrics (also written to metrics.json). Lightning's
    banners, tips and third-party deprecation warnings are shown only with ``verbose=true``
    (:func:`~proteinperformer.progress.lightning.lightning_notices_silenced`).

    With ``ckpt_path`` the run's saved settings are restored first (:mod:`proteinperformer.training.resume`)."""
    with lightning_notices_silenced(cfg.get("verbose", False)):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict:
    start = time.time()
    if cfg.get("ckpt_path"):  # a resume checkpoint is read without running code, and fails in one line
        cfg = resumed_config(cfg, read_torch(resolve_path(cfg.ckpt_path)))  # first: its trainer settings are checked
    # fail in one line, before any data is read, if this machine cannot run the requested accelerator/precision
    check_trainer(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("precision", "32-true"),
                  cfg.trainer.get("devices", 1))
    set_matmul_precision(cfg.trainer.get("matmul_precision"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # quiet: a bad init_from then fails in one line
    log.info("seed %d", cfg.seed)
    output_dir = Path(cfg.output_dir)
    net = _init_weights_from(cfg)
    save_run_config(cfg, output_dir)  # what a resume from this run's checkpoints restores
    log.info("data: %s", cfg.data._target_)
    datamodule = _instantiate_data(cfg)
    model = _instantiate_model(cfg, net)
    log.info("model: %s, %s parameters (%s)", cfg.model._target_, f"{model.model.num_parameters():,}",
             dict(cfg.model.config))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress-bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)  # resolved here: ${output_dir} is at the root
    trainer_cfg.pop("matmul_precision", None)  # torch's setting (set above), not a Trainer argument
    trainer: pl.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                                  plugins=[AtomicCheckpointIO()])
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = str(resolve_path(cfg.ckpt_path)) if cfg.get("ckpt_path") else None
    _fit(trainer, model, datamodule, ckpt_path)

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if best and not Path(best).is_file():  # a resumed run's "best" may be one top-k deleted since: validate now
        log.info("best checkpoint %s no longer exists; validating the final weights", best)
        best = ""
    # read before validate(): loading the best checkpoint restores the callbacks' state as it was then
    last = _last_checkpoint(trainer)
    final = trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    metrics = {
        "val_acc": final.get("val/acc"),
        "val_ppl": final.get("val/ppl"),
        "baseline_acc": final.get("val/baseline_acc"),
        "baseline_ppl": final.get("val/baseline_ppl"),
        "baseline": "unigram, " + unigram_description(model.alphabet, "train-split", "valid"),
        "best_checkpoint": best,
        "last_checkpoint": last,
        "global_step": trainer.global_step,
        "parameters": model.model.num_parameters(),
        "train_seconds": round(time.time() - start, 1),
    }
    if cfg.get("test"):
        test = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
        metrics.update({"test_acc": test.get("test/acc"), "test_ppl": test.get("test/ppl")})
    if metrics["val_ppl"] is not None and not math.isfinite(metrics["val_ppl"]):
        log.warning("validation perplexity is %s: training diverged. Lower model.lr or raise model.warmup_steps; "
                    "in 16-mixed try bf16-mixed", metrics["val_ppl"])
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "metrics.json", metrics)
        print(
            f"\nvalidation ({cfg.task_name}, step {trainer.global_step}): "
            f"accuracy {100 * metrics['val_acc']:.2f}%  perplexity {metrics['val_ppl']:.2f}\n"
            f"unigram baseline ({unigram_description(model.alphabet, 'train-split', 'valid')}): "
            f"accuracy {100 * metrics['baseline_acc']:.2f}%  "
            f"perplexity {metrics['baseline_ppl']:.2f}\n"
            f"checkpoint: {best or metrics['last_checkpoint']}\nmetrics:    {output_dir / 'metrics.json'}"
        )
    for logger in trainer.loggers:  # close the wandb run, so the next run in this process (sweeps) gets its own
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
    return metrics
