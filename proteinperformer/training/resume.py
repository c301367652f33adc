"""Resume from one path: ``ckpt_path=RUN/checkpoints/last.ckpt`` alone continues the run it came from.

Every run saves its effective config as ``RUN/.hydra/config.yaml`` (Hydra's own file under ``pp-train``; written by
:func:`save_run_config` when ``train()`` is called without Hydra). On resume (:func:`resumed_config`):

1. the settings this command line gives are the ones that differ from the default composition of ``train.yaml``;
2. ``model``, ``data``, ``trainer`` and ``task_name`` are the saved run's, other saved values (``seed``, callback
   settings) are taken where this run has the same key, and the settings of step 1 apply on top;
3. the network the config now describes must be the checkpoint's (``hyper_parameters``: model config and task):
   another size, task or alphabet is a one-line :class:`ResumeMismatch` naming both values. Dropout may change.

A checkpoint without its run folder (copied elsewhere, or from before saved configs) takes the model config from its
hyper-parameters; data and trainer settings then come from the command line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from proteinperformer.files import CONFIG_DIR, write_text_atomic
from proteinperformer.model import ModelConfig

log = logging.getLogger("proteinperformer.training.resume")

RUN_CONFIG = Path(".hydra") / "config.yaml"  # where Hydra saves a run's composed config
RESTORED_GROUPS = ("model", "data", "trainer", "task_name")  # taken whole from the saved run
NOT_RESTORED = ("output_dir", "ckpt_path", "init_from")  # this run's own
MAY_CHANGE = ("dropout",)  # model.config keys a resume may change


class ResumeMismatch(ValueError):
    """This run's settings describe another network than the checkpoint's."""


def run_config_path(ckpt: Path) -> Path:
    """``RUN/.hydra/config.yaml`` of a checkpoint at ``RUN/checkpoints/NAME.ckpt``."""
    return ckpt.resolve().parent.parent / RUN_CONFIG


def save_run_config(cfg: DictConfig, output_dir: Path) -> None:
    """Write ``cfg`` (unresolved, as Hydra does) to ``output_dir/.hydra/config.yaml`` (temp + rename)."""
    write_text_atomic(output_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg))


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value (lists are leaves) of an unresolved container."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _default_config() -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside pp-train's @hydra.main
        return compose("train")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train")


def _hydra_overrides() -> list[str]:
    """The ``key=value`` overrides of this pp-train command line ([] outside Hydra's app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def command_line_settings(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> value of every setting of ``cfg`` that differs from the default ``train.yaml``, and of every
    ``key=value`` given on the pp-train command line (also one that equals the default)."""
    given = _flat(OmegaConf.to_container(cfg, resolve=False))
    default = _flat(OmegaConf.to_container(_default_config(), resolve=False))
    settings = {k: v for k, v in given.items() if k not in default or default[k] != v}
    for override in _hydra_overrides():
        key = override.split("=", 1)[0].lstrip("+~")
        settings.update({k: v for k, v in given.items() if k == key or k.startswith(key + ".")})
    return settings


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def resumed_config(cfg: DictConfig, checkpoint: dict) -> DictConfig:
    """The config that resumes ``cfg.ckpt_path`` (see the module docstring); ``checkpoint`` is its content."""
    ckpt = Path(cfg.ckpt_path).expanduser()
    given = command_line_settings(cfg)
    saved_path = run_config_path(ckpt)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if saved_path.is_file():
        saved = OmegaConf.load(saved_path)
        merged = cfg.copy()
        with open_dict(merged):
            for group in RESTORED_GROUPS:  # whole: a group option of the saved run brings its own keys
                if group in saved:
                    merged[group] = saved[group]
        for key, value in _flat(OmegaConf.to_container(saved, resolve=False)).items():
            top = key.split(".")[0]
            if top not in (*RESTORED_GROUPS, *NOT_RESTORED, "hydra") and \
                    OmegaConf.select(cfg, key, default="<absent>", throw_on_resolution_failure=False) != "<absent>":
                _set(merged, key, value)
        for key, value in given.items():
            _set(merged, key, value)
        log.info("resume: run settings from %s, then %d given on the command line", saved_path, len(given))
    else:
        merged = cfg.copy()
        for key, value in (hparams.get("config") or {}).items():
            if f"model.config.{key}" not in given:
                _set(merged, f"model.config.{key}", value)
        log.info("resume: no %s; model config from the checkpoint, data and trainer settings from the command "
                 "line", saved_path)
    check_matches_checkpoint(merged, hparams, ckpt)
    return merged


def check_matches_checkpoint(cfg: DictConfig, hparams: dict, ckpt: Path) -> None:
    """Raise :class:`ResumeMismatch` when ``cfg`` describes another network or task than ``hparams``."""
    advice = (f"drop that setting to resume (the run's settings come from {ckpt}), or start a new run from its "
              f"weights with init_from={ckpt}")
    task = hparams.get("task")
    if task is not None and cfg.get("task_name") != task:
        raise ResumeMismatch(f"ckpt_path={ckpt} is a task={task} run, this run has task={cfg.get('task_name')}; "
                             f"{advice}")
    if not hparams.get("config"):
        return
    saved = ModelConfig(**hparams["config"]).to_dict()
    now = ModelConfig(**OmegaConf.to_container(cfg.model.config, resolve=True)).to_dict()
    for key, value in saved.items():
        if key not in MAY_CHANGE and now.get(key) != value:
            raise ResumeMismatch(f"ckpt_path={ckpt} has model.config.{key}={value}, this run has "
                                 f"model.config.{key}={now.get(key)}; {advice}")
