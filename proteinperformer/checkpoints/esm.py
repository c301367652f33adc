"""Import ESM-2 checkpoints into :class:`PerformerLM` (exact attention, or FAVOR+ in place of softmax).

Two source formats, both read without running code from the file:

- fair-esm ``.pt`` files (``esm2_t6_8M_UR50D.pt`` ... as ``esm.pretrained`` saves them in the torch hub cache):
  ``{"model": state dict with keys prefixed "encoder.sentence_encoder." or "encoder.", "cfg": {"model": an
  argparse.Namespace with encoder_layers, encoder_embed_dim, encoder_attention_heads, token_dropout}}``, read
  with ``torch.load(weights_only=True)`` and ``argparse.Namespace`` as the only allowed class; the contact
  regression ``<stem>-contact-regression.pt`` beside it is loaded too when present.
- Hugging Face ESM directories (``config.json`` + ``model.safetensors``, sharded safetensors with an index, or
  ``pytorch_model.bin``) with ``EsmForMaskedLM`` key names, read with ``safetensors`` / ``json``; transformers
  is not imported.

Loading is strict: every tensor of the source is used (the rotary ``inv_freq`` buffers and a tied decoder are
checked against what this package computes), none is left over, every weight of the model is filled, and
shapes must match; any failure raises :class:`EsmImportError` naming the file. ESM-1, ESM-1b, ESM-1v and the
MSA Transformer (learned positions, other layouts) are recognised and rejected with that message.

Name mapping (fair-esm -> PerformerLM): ``layers.i.self_attn.{q,k,v}_proj`` -> ``layers.i.attn.qkv``
(concatenated), ``out_proj`` -> ``attn.out``, ``self_attn_layer_norm`` -> ``norm1``, ``fc1``/``fc2`` ->
``mlp.fc``/``mlp.proj``, ``final_layer_norm`` -> ``norm2``, ``emb_layer_norm_after`` -> ``final_norm``,
``lm_head.{dense,layer_norm}`` -> ``lm_transform.*``, ``lm_head.bias`` -> ``lm_head.bias``,
``contact_head.regression`` -> ``contact_head``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from proteinperformer.attention.rotary import inverse_frequencies
from proteinperformer.checkpoints.files import CheckpointError, read_hf_weights, read_torch
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import ESM_TOKENS

SUPPORTED = "ESM-2 (esm2_t6_8M ... esm2_t48_15B, fair-esm .pt or Hugging Face EsmForMaskedLM)"
UNSUPPORTED_ARCH = {"roberta_large": "ESM-1b / ESM-1v", "protein_bert_base": "ESM-1", "msa_transformer":
                    "MSA Transformer"}
DEFAULT_KERNEL = "softmax"  # the only FAVOR+ kernel that estimates the softmax attention ESM-2 was trained with


class EsmImportError(CheckpointError):
    """A file or directory is not an importable ESM-2 checkpoint; the message names it and what was expected."""


def esm2_config(layers: int, dim: int, heads: int, token_dropout: bool = True, layer_norm_eps: float = 1e-5,
                ff_dim: int | None = None, contact_head: bool = False, attention: str = "exact",
                num_features: int = 256, kernel: str = DEFAULT_KERNEL) -> ModelConfig:
    """The :class:`ModelConfig` of an ESM-2 network (ESM-2 8M: layers=6, dim=320, heads=20)."""
    return ModelConfig(
        vocab_size=len(ESM_TOKENS), dim=dim, depth=layers, heads=heads, ff_dim=ff_dim or 4 * dim,
        positions="rotary", max_positions=1024,  # ESM-2's training length: exact attention is capped at 1,022
        attention=attention, kernel=kernel, num_features=num_features, orthogonal=True, use_projection=True,
        causal=False, dropout=0.0, padding_idx=ESM_TOKENS.index("<pad>"), alphabet="esm",
        layer_norm_eps=layer_norm_eps, lm_head_dense=True, token_dropout=token_dropout, contact_head=contact_head,
    )


# ---- reading ------------------------------------------------------------------------------------
def _namespace(obj) -> dict:
    return vars(obj) if isinstance(obj, argparse.Namespace) else dict(obj) if isinstance(obj, dict) else {}


def fair_esm_weights(path: Path, data: dict) -> tuple[dict, dict[str, torch.Tensor], list[Path]]:
    """(model cfg dict, state dict with fair-esm's unprefixed names, files read) of a fair-esm file's content."""
    if "args" in data and "cfg" not in data:
        arch = getattr(data["args"], "arch", None) if not isinstance(data["args"], dict) else data["args"].get("arch")
        name = UNSUPPORTED_ARCH.get(arch, f"arch {arch!r}")
        raise EsmImportError(f"{path}: a {name} checkpoint, which is not supported; supported: {SUPPORTED}")
    cfg = _namespace((data.get("cfg") or {}).get("model") if isinstance(data.get("cfg"), dict) else None)
    need = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads")
    if not isinstance(data.get("model"), dict) or any(k not in cfg for k in need):
        raise EsmImportError(f"{path}: not a fair-esm ESM-2 checkpoint (expected 'model' and 'cfg' with cfg['model']."
                             f"{{{', '.join(need)}}}); top-level keys are {sorted(map(str, data))}")
    state = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k): v for k, v in data["model"].items()}
    if any("embed_positions" in k or "row_self_attention" in k for k in state):
        raise EsmImportError(f"{path}: has learned positions / MSA row attention (ESM-1 family or MSA "
                             f"Transformer), not supported; supported: {SUPPORTED}")
    files = [path]
    regression = path.with_name(path.stem + "-contact-regression.pt")
    if regression.is_file():
        reg = read_torch(regression)
        if not isinstance(reg, dict) or not isinstance(reg.get("model"), dict):
            raise EsmImportError(f"{regression}: not a fair-esm contact regression file (expected {{'model': ...}})")
        for k, v in reg["model"].items():
            state[re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k)] = v
        files.append(regression)
    return cfg, state, files


_HF_LAYER = [  # Hugging Face EsmForMaskedLM -> fair-esm names inside layer i
    ("attention.self.query.", "self_attn.q_proj."), ("attention.self.key.", "self_attn.k_proj."),
    ("attention.self.value.", "self_attn.v_proj."), ("attention.output.dense.", "self_attn.out_proj."),
    ("attention.LayerNorm.", "self_attn_layer_norm."), ("attention.self.rotary_embeddings.", "self_attn.rot_emb."),
    ("intermediate.dense.", "fc1."), ("output.dense.", "fc2."), ("LayerNorm.", "final_layer_norm."),
]


def _hf_name(key: str) -> str:
    """A Hugging Face ESM key in fair-esm's naming (unknown keys are returned unchanged, so they stay unused).

    Also reads the legacy spellings transformers >= 5 writes: LayerNorm ``gamma``/``beta`` and one
    ``encoder.layer.*.attention.self.rotary_embeddings.inv_freq`` for all layers.
    """
    k = key.removeprefix("esm.")
    if k == "encoder.layer.*.attention.self.rotary_embeddings.inv_freq":
        return "rot_emb.inv_freq"
    k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
    if m := re.match(r"encoder\.layer\.(\d+)\.(.*)", k):
        for old, new in _HF_LAYER:
            if m.group(2).startswith(old):
                return f"layers.{m.group(1)}.{new}{m.group(2)[len(old):]}"
        return key
    fixed = {"embeddings.word_embeddings.weight": "embed_tokens.weight", "rotary_embeddings.inv_freq":
             "rot_emb.inv_freq", "lm_head.decoder.weight": "lm_head.weight", "lm_head.decoder.bias":
             "lm_head.decoder_bias", "embeddings.position_ids": "position_ids"}
    if k in fixed:
        return fixed[k]
    for old, new in (("encoder.emb_layer_norm_after.", "emb_layer_norm_after."), ("lm_head.", "lm_head."),
                     ("contact_head.regression.", "contact_head.regression.")):
        if k.startswith(old):
            return new + k[len(old):]
    return key


def hf_weights(directory: Path) -> tuple[dict, dict[str, torch.Tensor], list[Path]]:
    """(config.json dict, state dict in fair-esm names, files read) of a Hugging Face ESM directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise EsmImportError(f"{directory}: a directory without config.json; expected a Hugging Face ESM model "
                             "directory (config.json + model.safetensors or pytorch_model.bin)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EsmImportError(f"{config_path}: not valid JSON ({err})") from None
    if config.get("model_type") != "esm" or config.get("is_folding_model"):
        raise EsmImportError(f"{config_path}: model_type {config.get('model_type')!r}"
                             f"{' (ESMFold)' if config.get('is_folding_model') else ''} is not supported; "
                             f"supported: {SUPPORTED}")
    if config.get("position_embedding_type", "absolute") != "rotary" or config.get("emb_layer_norm_before"):
        raise EsmImportError(f"{config_path}: position_embedding_type={config.get('position_embedding_type')!r}, "
                             f"emb_layer_norm_before={config.get('emb_layer_norm_before')} is an ESM-1b-style "
                             f"model, not supported; supported: {SUPPORTED}")
    raw, files = read_hf_weights(directory, EsmImportError)
    return config, {_hf_name(k): v for k, v in raw.items()}, files


# ---- building -----------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> PerformerLM:
    """A PerformerLM with ``cfg`` filled from ``state`` (fair-esm names); strict, errors name ``source``."""
    model = PerformerLM(cfg)
    target = model.state_dict()
    state = dict(state)
    used: dict[str, torch.Tensor] = {}
    problems: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name not in state:
            problems.append(f"missing {name}")
            return None
        return state.pop(name)

    def put(name: str, value: torch.Tensor | None, origin: str) -> None:
        if value is None:
            return
        if tuple(value.shape) != tuple(target[name].shape):
            problems.append(f"{origin} has shape {tuple(value.shape)}, the config wants {tuple(target[name].shape)}")
        else:
            used[name] = value

    def check(name: str, expected: torch.Tensor, what: str) -> None:
        value = state.pop(name, None)
        if value is not None and not _same(value, expected):
            problems.append(f"{name} differs from {what}")

    inv_freq = inverse_frequencies(cfg.dim // cfg.heads)
    put("embed_tokens.weight", take("embed_tokens.weight"), "embed_tokens.weight")
    check("rot_emb.inv_freq", inv_freq, "the rotary frequencies 1/10000^(2i/d)")
    for i in range(cfg.depth):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [take(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"]
            if all(t is not None for t in parts):
                put(f"{p}attn.qkv.{kind}", torch.cat(parts, 0), f"{p}self_attn.{{q,k,v}}_proj.{kind}")
            for ours, theirs in (("attn.out", "self_attn.out_proj"), ("norm1", "self_attn_layer_norm"),
                                 ("mlp.fc", "fc1"), ("mlp.proj", "fc2"), ("norm2", "final_layer_norm")):
                put(f"{p}{ours}.{kind}", take(f"{p}{theirs}.{kind}"), f"{p}{theirs}.{kind}")
        check(f"{p}self_attn.rot_emb.inv_freq", inv_freq, "the rotary frequencies 1/10000^(2i/d)")
    for kind in ("weight", "bias"):
        put(f"final_norm.{kind}", take(f"emb_layer_norm_after.{kind}"), f"emb_layer_norm_after.{kind}")
        put(f"lm_transform.dense.{kind}", take(f"lm_head.dense.{kind}"), f"lm_head.dense.{kind}")
        put(f"lm_transform.layer_norm.{kind}", take(f"lm_head.layer_norm.{kind}"), f"lm_head.layer_norm.{kind}")
        if cfg.contact_head:
            put(f"contact_head.{kind}", take(f"contact_head.regression.{kind}"), f"contact_head.regression.{kind}")
    put("lm_head.bias", take("lm_head.bias"), "lm_head.bias")
    if "embed_tokens.weight" in used:
        check("lm_head.weight", used["embed_tokens.weight"], "embed_tokens.weight (the decoder must be tied)")
    if "lm_head.bias" in used:
        check("lm_head.decoder_bias", used["lm_head.bias"], "lm_head.bias")
    position_ids = state.pop("position_ids", None)
    if position_ids is not None and not torch.equal(position_ids.flatten(), torch.arange(position_ids.numel())):
        problems.append("embeddings.position_ids is not 0, 1, 2, ...")
    if state:
        problems.append(f"unused tensors {sorted(state)[:20]}{' ...' if len(state) > 20 else ''}")
    filled = set(used) | {k for k in target if k.endswith("attn.projection")} | {"lm_head.weight"}
    if not problems and (left := sorted(set(target) - filled)):
        problems.append(f"model weights not in the file: {left}")
    if problems:
        raise EsmImportError(f"{source}: does not fit an ESM-2 model with {cfg.depth} layers, width {cfg.dim}, "
                             f"{cfg.heads} heads: " + "; ".join(problems))
    model.load_state_dict({**target, **used}, strict=True)
    model.lm_head.weight = model.embed_tokens.weight  # keep the tie after load_state_dict
    return model


def load_esm(path: str | Path, data: dict | None = None, attention: str = "exact", num_features: int = 256,
             kernel: str = DEFAULT_KERNEL) -> PerformerLM:
    """Load a fair-esm ESM-2 ``.pt`` file or a Hugging Face ESM directory as a PerformerLM (eval mode, CPU).

    ``data``: the already-read content of a ``.pt`` file (avoids reading it twice). ``attention="favor"``
    swaps softmax attention for FAVOR+ with ``num_features`` random features per head and ``kernel``.
    """
    path = Path(path)
    if path.is_dir():
        config, state, files = hf_weights(path)
        try:
            vocab = config.get("vocab_list")
            if (vocab is not None and list(vocab) != list(ESM_TOKENS)) or config.get("vocab_size", 33) != 33:
                raise EsmImportError(f"{path / 'config.json'}: vocabulary differs from ESM-2's 33 tokens")
            if config.get("hidden_act", "gelu") != "gelu":
                raise EsmImportError(f"{path / 'config.json'}: hidden_act {config['hidden_act']!r}; ESM-2 uses gelu")
            cfg = esm2_config(config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                              bool(config.get("token_dropout", False)), float(config.get("layer_norm_eps", 1e-12)),
                              ff_dim=config["intermediate_size"],
                              contact_head="contact_head.regression.weight" in state, attention=attention,
                              num_features=num_features, kernel=kernel)
        except KeyError as err:
            raise EsmImportError(f"{path / 'config.json'}: missing {err}") from None
    else:
        data = read_torch(path) if data is None else data
        if not isinstance(data, dict):
            raise EsmImportError(f"{path}: holds a {type(data).__name__}; expected a checkpoint dict")
        model_cfg, state, files = fair_esm_weights(path, data)
        cfg = esm2_config(int(model_cfg["encoder_layers"]), int(model_cfg["encoder_embed_dim"]),
                          int(model_cfg["encoder_attention_heads"]), bool(model_cfg.get("token_dropout", True)),
                          contact_head="contact_head.regression.weight" in state, attention=attention,
                          num_features=num_features, kernel=kernel)
    return build_model(cfg, state, " + ".join(map(str, files))).eval()
