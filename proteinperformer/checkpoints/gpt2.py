"""Import Hugging Face GPT-2 causal LMs with a per-residue vocabulary (IgLM ...) into :class:`PerformerLM`.

The source is a directory as ``GPT2LMHeadModel.save_pretrained`` writes it: ``config.json`` (``model_type:
gpt2``), ``model.safetensors`` (or sharded safetensors with an index, or ``pytorch_model.bin``, read with
``torch.load(weights_only=True)``) and a ``vocab.txt`` with one token per line in id order, beside the weights or
one folder up (IgLM's package keeps ``trained_models/vocab.txt`` next to ``trained_models/IgLM/``). transformers
is not imported. The vocabulary becomes the model's alphabet (``ModelConfig.alphabet`` holds the token list, so
every checkpoint written from the model carries it); its tags (``[HEAVY]``, ``[HUMAN]`` ...) may be written
inside sequences: ``"[HEAVY][HUMAN]EVQLVESGG"``.

GPT-2 is this package's causal pre-LayerNorm stack: learned absolute positions (``wpe``), blocks
``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with ``gelu_new``, a final ``ln_f`` and an LM head tied to ``wte``
without a bias. Name mapping (GPT-2 -> PerformerLM): ``wte`` -> ``embed_tokens``, ``wpe`` -> ``embed_positions``,
``h.i.ln_1`` -> ``layers.i.norm1``, ``h.i.attn.c_attn`` (fused q, k, v) -> ``attn.qkv``, ``attn.c_proj`` ->
``attn.out``, ``ln_2`` -> ``norm2``, ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc`` / ``mlp.proj``, ``ln_f`` ->
``final_norm``; GPT-2's ``Conv1D`` stores weights as (in, out), so each is transposed. ``lm_head.bias`` (which
GPT-2 lacks) is set to zeros.

Loading is strict as the ESM-2 importer's: every tensor used (the old causal-mask buffers ``attn.bias`` /
``attn.masked_bias`` are checked to be what GPT-2 computes), every weight filled, shapes checked. Unsupported
configurations are refused in one line saying what: an activation other than gelu / gelu_new, cross-attention,
``scale_attn_by_inverse_layer_idx``, unscaled attention, and BPE vocabularies (ProtGPT2's ``vocab.json`` +
``merges.txt``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from proteinperformer.checkpoints.files import CheckpointError, read_hf_weights
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet

ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}  # HF name -> ours
DEFAULT_KERNEL = "softmax"  # FAVOR+ estimates the softmax attention GPT-2 was trained with


class Gpt2ImportError(CheckpointError):
    """A directory is not an importable GPT-2 model; the message names it and what is unsupported."""


def is_gpt2_directory(directory: Path) -> bool:
    """True when ``directory/config.json`` declares ``model_type: gpt2``."""
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == "gpt2"
    except (OSError, ValueError, AttributeError):
        return False


def read_vocab(directory: Path) -> tuple[list[str], Path]:
    """(tokens in id order, path) of the per-residue ``vocab.txt`` in ``directory`` or its parent."""
    for folder in (directory, directory.parent):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            raise Gpt2ImportError(f"{folder}: a BPE vocabulary (vocab.json + merges.txt, as ProtGPT2's) is not "
                                  "supported; supported: a per-residue vocab.txt (one token per line, as IgLM's)")
        path = folder / "vocab.txt"
        if path.is_file():
            tokens = path.read_text().splitlines()
            while tokens and not tokens[-1].strip():
                tokens.pop()
            tokens = [t.strip() for t in tokens]
            if multi := [t for t in tokens if len(t) > 1 and t[0] + t[-1] not in ("[]", "<>")]:
                raise Gpt2ImportError(f"{path}: multi-letter tokens {multi[:5]} make this a subword (BPE / "
                                      "WordPiece) vocabulary, which is not supported; supported: one residue per "
                                      "token plus bracketed special tokens such as [PAD] [HEAVY]")
            try:
                Alphabet(tokens)
            except ValueError as err:
                raise Gpt2ImportError(f"{path}: not a per-residue protein vocabulary ({err})") from None
            return tokens, path
    raise Gpt2ImportError(f"{directory}: no vocab.txt here or in {directory.parent}; a GPT-2 protein model needs "
                          "its per-residue vocabulary (one token per line, in id order)")


def read_config(directory: Path) -> dict:
    """config.json of a GPT-2 directory, with every unsupported setting refused in one line."""
    path = directory / "config.json"
    if not path.is_file():
        raise Gpt2ImportError(f"{directory}: a directory without config.json; expected a Hugging Face GPT-2 model "
                              "directory (config.json + model.safetensors or pytorch_model.bin + vocab.txt)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Gpt2ImportError(f"{path}: not valid JSON ({err})") from None
    unsupported = {
        "activation_function": (config.get("activation_function", "gelu_new") not in ACTIVATIONS,
                                f"activation_function {config.get('activation_function')!r} (supported: "
                                f"{', '.join(ACTIVATIONS)})"),
        "add_cross_attention": (bool(config.get("add_cross_attention")), "cross-attention (add_cross_attention)"),
        "scale_attn_by_inverse_layer_idx": (bool(config.get("scale_attn_by_inverse_layer_idx")),
                                            "scale_attn_by_inverse_layer_idx"),
        "scale_attn_weights": (not config.get("scale_attn_weights", True), "unscaled attention "
                                                                            "(scale_attn_weights=false)"),
    }
    if refused := [what for bad, what in unsupported.values() if bad]:
        raise Gpt2ImportError(f"{path}: {'; '.join(refused)} not supported by the GPT-2 importer")
    if missing := [k for k in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions") if k not in config]:
        raise Gpt2ImportError(f"{path}: missing {missing}")
    return config


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """(state dict without the ``transformer.`` prefix, files read) of a GPT-2 directory; no code is run."""
    raw, files = read_hf_weights(directory, Gpt2ImportError)
    return {k.removeprefix("transformer."): v for k, v in raw.items()}, files


def gpt2_model_config(config: dict, tokens: list[str], attention: str = "exact", num_features: int = 256,
                      kernel: str = DEFAULT_KERNEL) -> ModelConfig:
    """The :class:`ModelConfig` of a GPT-2 ``config.json`` with vocabulary ``tokens`` (IgLM: 4 × 512, 8 heads)."""
    alphabet = Alphabet(tokens)
    dim = int(config["n_embd"])
    return ModelConfig(
        vocab_size=int(config["vocab_size"]), dim=dim, depth=int(config["n_layer"]), heads=int(config["n_head"]),
        ff_dim=int(config.get("n_inner") or 4 * dim), positions="learned", max_positions=int(config["n_positions"]),
        attention=attention, kernel=kernel, num_features=num_features, orthogonal=True, use_projection=True,
        causal=True, dropout=0.0, padding_idx=alphabet.padding_idx, alphabet=list(tokens),
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        activation=ACTIVATIONS[config.get("activation_function", "gelu_new")],
    )


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> PerformerLM:
    """A PerformerLM with ``cfg`` filled from GPT-2's ``state``; strict, errors name ``source``."""
    model = PerformerLM(cfg)
    target = model.state_dict()
    state = dict(state)
    used: dict[str, torch.Tensor] = {}
    problems: list[str] = []

    def put(ours: str, theirs: str, transpose: bool = False) -> None:
        if theirs not in state:
            problems.append(f"missing {theirs}")
            return
        value = state.pop(theirs)
        want = tuple(target[ours].shape)[::-1] if transpose else tuple(target[ours].shape)  # in the file's layout
        if tuple(value.shape) != want:
            problems.append(f"{theirs} has shape {tuple(value.shape)}, the config wants {want}")
        else:
            used[ours] = (value.t() if transpose else value).contiguous()

    put("embed_tokens.weight", "wte.weight")
    put("embed_positions.weight", "wpe.weight")
    n = cfg.max_positions
    causal_mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    for i in range(cfg.depth):
        p, h = f"layers.{i}.", f"h.{i}."
        for kind in ("weight", "bias"):
            conv = kind == "weight"  # Conv1D weights are (in, out): transpose to nn.Linear's (out, in)
            put(f"{p}norm1.{kind}", f"{h}ln_1.{kind}")
            put(f"{p}attn.qkv.{kind}", f"{h}attn.c_attn.{kind}", conv)
            put(f"{p}attn.out.{kind}", f"{h}attn.c_proj.{kind}", conv)
            put(f"{p}norm2.{kind}", f"{h}ln_2.{kind}")
            put(f"{p}mlp.fc.{kind}", f"{h}mlp.c_fc.{kind}", conv)
            put(f"{p}mlp.proj.{kind}", f"{h}mlp.c_proj.{kind}", conv)
        # buffers older transformers saved: the causal mask (lower-triangular ones) and the masked score -1e4
        if (mask := state.pop(f"{h}attn.bias", None)) is not None and not torch.equal(mask.bool(), causal_mask):
            problems.append(f"{h}attn.bias is not the lower-triangular causal mask of {n} positions")
        if (masked := state.pop(f"{h}attn.masked_bias", None)) is not None and float(masked) != -1e4:
            problems.append(f"{h}attn.masked_bias is {float(masked)}, not -1e4")
    for kind in ("weight", "bias"):
        put(f"final_norm.{kind}", f"ln_f.{kind}")
    head = state.pop("lm_head.weight", None)
    if head is not None and "embed_tokens.weight" in used and not torch.equal(head, used["embed_tokens.weight"]):
        problems.append("lm_head.weight differs from wte.weight (the LM head must be tied)")
    if "lm_head.bias" in state:
        problems.append("lm_head.bias present (GPT2LMHeadModel has none)")
    used["lm_head.bias"] = torch.zeros(cfg.vocab_size)  # GPT-2's head has no bias
    if state:
        problems.append(f"unused tensors {sorted(state)[:20]}{' ...' if len(state) > 20 else ''}")
    filled = set(used) | {k for k in target if k.endswith("attn.projection")} | {"lm_head.weight"}
    if not problems and (left := sorted(set(target) - filled)):
        problems.append(f"model weights not in the file: {left}")
    if problems:
        raise Gpt2ImportError(f"{source}: does not fit a GPT-2 model with {cfg.depth} layers, width {cfg.dim}, "
                              f"{cfg.heads} heads, {cfg.max_positions} positions: " + "; ".join(problems))
    dtype = target["embed_tokens.weight"].dtype
    model.load_state_dict({**target, **{k: v.to(dtype) for k, v in used.items()}}, strict=True)
    model.lm_head.weight = model.embed_tokens.weight  # keep the tie after load_state_dict
    return model


def load_gpt2(directory: str | Path, attention: str = "exact", num_features: int = 256,
              kernel: str = DEFAULT_KERNEL) -> PerformerLM:
    """Load a Hugging Face GPT-2 directory with a per-residue ``vocab.txt`` as a causal PerformerLM (eval, CPU).

    ``attention="favor"`` swaps softmax attention for FAVOR+ with ``num_features`` random features per head and
    ``kernel``. ``model.alphabet`` is the vocabulary of ``vocab.txt``. Raises :class:`Gpt2ImportError` naming
    the file for anything unsupported or not matching.
    """
    directory = Path(directory)
    config = read_config(directory)
    tokens, vocab_path = read_vocab(directory)
    if len(tokens) > int(config["vocab_size"]):
        raise Gpt2ImportError(f"{vocab_path}: {len(tokens)} tokens, more than config.json's vocab_size "
                              f"{config['vocab_size']}")
    state, files = read_weights(directory)
    cfg = gpt2_model_config(config, tokens, attention, num_features, kernel)
    return build_model(cfg, state, " + ".join(map(str, files))).eval()
