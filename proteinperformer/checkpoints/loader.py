"""The one checkpoint loader of the package, and the writers of project checkpoints.

:func:`load_model` reads every kind of file the commands take: a ``pp-train`` / ``pp-convert`` checkpoint, a
fair-esm ESM-2 ``.pt`` file, a Hugging Face ESM directory (:mod:`.esm`) or a Hugging Face GPT-2 directory with a
per-residue ``vocab.txt`` such as IgLM's (:mod:`.gpt2`). Nothing is unpickled beyond tensors
and plain containers (:func:`~.files.read_torch`), and loading is strict: every tensor used, every weight
filled, shapes checked; anything else raises :class:`~.files.CheckpointError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from proteinperformer.checkpoints.esm import load_esm
from proteinperformer.checkpoints.files import CheckpointError, read_torch, save_atomic
from proteinperformer.checkpoints.gpt2 import is_gpt2_directory, load_gpt2
from proteinperformer.model import ModelConfig, PerformerLM, convert_attention, is_calibrated
from proteinperformer.tokenizer import Alphabet

__all__ = ["CheckpointError", "export_slim", "load_model", "save_checkpoint"]


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    attention: str | None = None,
    num_features: int | None = None,
    kernel: str | None = None,
    features: str | None = None,
) -> PerformerLM:
    """Load a model from any file a command takes: a ``pp-train`` / ``pp-convert`` checkpoint, a fair-esm ESM-2 ``.pt``
    (``esm2_t6_8M_UR50D.pt`` ..., with ``-contact-regression.pt`` beside it when present), a Hugging Face
    ESM directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or a Hugging Face GPT-2
    directory with a per-residue ``vocab.txt`` (IgLM; causal, the vocabulary becomes ``model.alphabet``).

    ``attention``: None keeps the file's attention (ESM-2 / GPT-2 files: exact softmax), "exact" or "favor" swaps
    it (weights kept; FAVOR+ draws ``num_features`` random features per head, default 256, with ``kernel``,
    default "softmax" for ESM-2 / GPT-2 and the checkpoint's kernel otherwise; see :func:`convert_attention`).
    ``features``: None keeps the file's ("favor+" unless it was calibrated by ``pp-convert --features``);
    one of options.FEATURES ("favor+", "oprf", ...) switches the softmax kernel's feature map; FAVOR++ needs the
    calibration statistics the checkpoint carries (``pp-convert ... --features oprf --calibrate FASTA``). A
    calibrated checkpoint loads with its frozen A and Ψ.
    Checks strictly: every tensor must be used and every weight filled with the right shape, the alphabet
    must be one this package knows; anything else raises :class:`CheckpointError` naming the file.
    Returns the model in eval mode on ``device``; ``model.alphabet`` is the tokenizer that goes with it.
    """
    path = Path(path)
    return _with_features(_load(path, attention, num_features, kernel), path, features).to(device).eval()


def _load(path: Path, attention: str | None, num_features: int | None, kernel: str | None) -> PerformerLM:
    hf_file = path.suffix in (".safetensors", ".bin", ".json") and (path.parent / "config.json").is_file()
    if (path.is_dir() or hf_file) and is_gpt2_directory(path if path.is_dir() else path.parent):
        return load_gpt2(path if path.is_dir() else path.parent, attention=attention or "exact",
                         num_features=num_features or 256, kernel=kernel or "softmax")
    if path.is_dir() or hf_file:
        return load_esm(path if path.is_dir() else path.parent, attention=attention or "exact",
                        num_features=num_features or 256, kernel=kernel or "softmax")
    ckpt = read_torch(path)
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and ({"cfg", "args"} & set(ckpt)):
        return load_esm(path, data=ckpt, attention=attention or "exact", num_features=num_features or 256,
                        kernel=kernel or "softmax")
    model = _load_project_checkpoint(path, ckpt)
    if attention is not None or num_features is not None or kernel is not None:
        try:
            model = convert_attention(model, attention, num_features, kernel)
        except ValueError as err:  # e.g. a FAVOR++ checkpoint asked for the relu kernel
            raise CheckpointError(f"{path}: {err}") from None
    return model


def _with_features(model: PerformerLM, path: Path, features: str | None) -> PerformerLM:
    """``model`` with the feature map ``features`` (None: as it is); CheckpointError if it cannot have it."""
    if features is None or features == model.config.features:
        return model
    if model.config.attention != "favor":
        raise CheckpointError(f"{path}: features {features!r} apply to FAVOR+ attention, and this model has "
                              f"{model.config.attention} attention; add --attention favor")
    try:
        model = convert_attention(model, features=features)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if features != "favor+" and not is_calibrated(model):
        raise CheckpointError(f"{path}: features {features!r} need A and Ψ calibrated on sequences, and this model "
                              f"has none; write a calibrated checkpoint with pp-convert {path} OUT --attention favor "
                              f"--features {features} --calibrate FASTA, and load that")
    return model


def _load_project_checkpoint(path: Path, ckpt: object) -> PerformerLM:
    """The PerformerLM of a checkpoint written by ``train.py`` / :func:`export_slim` / ``pp-convert``."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a proteinperformer checkpoint (holds a {type(ckpt).__name__})")
    hparams = ckpt.get("hyper_parameters") or {}
    missing = [k for k in ("state_dict", "hyper_parameters", "alphabet") if k not in ckpt]
    if "hyper_parameters" in ckpt and "config" not in hparams:
        missing.append("hyper_parameters.config")
    if missing:
        raise CheckpointError(
            f"{path}: not a proteinperformer checkpoint: missing {missing}; top-level keys are {sorted(ckpt)} "
            "(expected a proteinperformer checkpoint, a fair-esm ESM-2 .pt with 'model' and 'cfg', or a Hugging "
            "Face ESM directory)"
        )
    try:
        cfg = ModelConfig(**hparams["config"])
        known = Alphabet(cfg.alphabet).all_toks
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: hyper_parameters.config does not fit ModelConfig ({err})") from None
    if list(ckpt["alphabet"]) != known:
        raise CheckpointError(f"{path}: the checkpoint's alphabet {ckpt['alphabet']} differs from this package's "
                              f"{cfg.alphabet!r} alphabet {known}")
    model = PerformerLM(cfg)
    expected = model.state_dict()
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    unexpected = sorted(k for k in ckpt["state_dict"] if not k.startswith("model.") or k[6:] not in expected)
    missing = sorted(f"model.{k}" for k in expected if k not in state)
    shapes = [f"model.{k} {tuple(v.shape)} (config wants {tuple(expected[k].shape)})"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: weights do not match the config {cfg.to_dict()}: missing keys {missing}, "
            f"unexpected keys {unexpected}, wrong shapes {shapes}"
        )
    model.load_state_dict(state, strict=True)
    return model


def export_slim(src: str | Path, dst: str | Path) -> Path:
    """Write a copy of checkpoint ``src`` with only weights, hyper-parameters, alphabet and step counters
    (no optimiser or callback state) to ``dst`` (temp file + rename); returns ``dst``. The copy loads with
    :func:`load_model` and ``ProteinLM.load_from_checkpoint`` (for evaluation, not for resuming training)."""
    ckpt = read_torch(src)
    _load_project_checkpoint(Path(src), ckpt)  # validate first: a project checkpoint whose weights fit its config
    keep = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "alphabet",
            "pytorch-lightning_version", "epoch", "global_step")
    return save_atomic({k: ckpt[k] for k in keep if k in ckpt}, dst)


def save_checkpoint(model: PerformerLM, path: str | Path, source: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` as a project checkpoint (temp file + rename) that ``load_model`` and ``init_from`` read;
    ``extra``: more plain entries (e.g. ``transfer``: how the attention was transferred)."""
    ckpt = {**(extra or {}),
        "state_dict": {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": model.config.to_dict(), "task": "clm" if model.config.causal else "mlm"},
        "alphabet": list(model.alphabet.all_toks),
        "converted_from": str(source),
    }
    return save_atomic(ckpt, path)
