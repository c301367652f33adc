"""Sample protein sequences from an autoregressive (CLM) checkpoint (the ``pp-generate`` command).

Decoding runs one token at a time through each attention layer's ``step``: for FAVOR+ models the state is
the running sums φ(K)ᵀV and φ(K)ᵀ1 (constant time and memory per token, whatever the length so far);
for the exact Transformer it is a KV cache. Each sample starts with ``<cls>`` and an optional prompt,
then draws residues (temperature, top-k, top-p) until ``<eos>`` or ``max_length`` residues. Only
amino-acid letters and ``<eos>`` can be drawn, so every output is a valid protein sequence.

    pp-generate CKPT OUT.fasta --num-samples 10 --max-length 300 --temperature 0.8 --top-p 0.95 --prompt M
"""

from __future__ import annotations

from pathlib import Path

import torch

from proteinperformer.attention import FavorState, KVCache
from proteinperformer.checkpoints import load_model
from proteinperformer.files import write_text_atomic
from proteinperformer.model import PerformerLM
from proteinperformer.model.precision import inference_autocast
from proteinperformer.tokenizer import Alphabet


def load_clm(checkpoint: str | Path, device: str | torch.device = "cpu",
             features: str | None = None) -> tuple[PerformerLM, Alphabet]:
    """The network and alphabet of a CLM checkpoint (read by :func:`~proteinperformer.checkpoints.load_model`,
    strictly and without running code), in eval mode on ``device``; ``features`` as load_model's.

    Raises ValueError for a masked-LM (bidirectional) checkpoint, which cannot generate left to right.
    """
    model = load_model(checkpoint, device=device, features=features)
    if not model.config.causal:
        raise ValueError(
            f"{checkpoint}: a masked-LM (bidirectional) checkpoint; sampling needs an autoregressive one: "
            "train with task=clm (e.g. experiment=paper_uni_1024)"
        )
    return model, model.alphabet


def init_states(model: PerformerLM, batch_size: int, device: torch.device | None = None) -> list:
    """One empty decoding state per layer: FavorState for FAVOR+, KVCache for exact attention."""
    dtype = next(model.parameters()).dtype
    return [block.attn.init_state(batch_size, device=device, dtype=dtype) for block in model.layers]


@torch.no_grad()
def step_logits(
    model: PerformerLM, tokens: torch.Tensor, position: int, states: list[FavorState | KVCache]
) -> tuple[torch.Tensor, list[FavorState | KVCache]]:
    """Logits for the next token after feeding ``tokens`` (LongTensor [B]) at ``position``.

    The same computation as ``model(...)["logits"][:, position]`` on the whole prefix (causal model, no
    padding), but each attention layer only updates its state. Returns (logits [B, V], new states).
    """
    x = model.embed_tokens(tokens[:, None])  # (B, 1, D)
    x = x + model.position_embedding(position, 1, x.dtype)
    new_states = []
    for block, state in zip(model.layers, states, strict=True):
        y, state = block.attn.step(block.norm1(x), state)
        x = x + y
        x = x + block.mlp(block.norm2(x))
        new_states.append(state)
    return model.logits(model.final_norm(x))[:, 0], new_states  # (B, V)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0 = all) and the smallest set with probability ≥ ``top_p``.

    logits [B, V] -> [B, V] with the rest set to -inf (nucleus sampling, Holtzman et al. 2020).
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: PerformerLM,
    alphabet: Alphabet,
    num_samples: int = 1,
    max_length: int = 500,
    prompt: str = "",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    precision: str = "32",
    start_with_cls: bool = True,
) -> list[str]:
    """Draw ``num_samples`` sequences (in parallel) that start with ``prompt``; returns residue strings.

    ``max_length`` counts residues including the prompt; a sequence ends at ``<eos>`` or there. ``precision``
    "bf16" / "16" runs each decoding step under torch.autocast (FAVOR+ states stay float32). With a vocabulary
    that has tags the prompt may begin with them (``"[HEAVY][HUMAN]EVQ"``); ``start_with_cls=False`` feeds the
    prompt without a leading ``<cls>`` (GPT-2 imports such as IgLM, whose sequences start with their tags).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    prefix = alphabet.encode(prompt, "prompt").tolist() if prompt else []
    if len(prefix) > max_length:
        raise ValueError(f"prompt of {len(prefix)} residues is longer than max_length={max_length}")
    feed = ([alphabet.cls_idx] if start_with_cls else []) + prefix  # what is fed before the first draw
    if not feed:
        raise ValueError("start_with_cls=False needs a prompt (e.g. the model's conditioning tags)")
    longest = model.config.max_positions + 1 - (len(feed) - len(prefix))  # the last draw reads position longest
    if model.config.positions == "learned" and max_length > longest:
        raise ValueError(f"max_length={max_length} residues is past the {model.config.max_positions} positions this "
                         f"model learned; give --max-length {longest} or less")
    allowed = torch.full((model.config.vocab_size,), float("-inf"), device=device)
    allowed[alphabet.residue_ids + [alphabet.eos_idx]] = 0.0  # only residues or the end can be drawn
    generator = torch.Generator(device=device).manual_seed(seed)

    autocast = inference_autocast(precision, device)
    states = init_states(model, num_samples, device)
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)  # (B, len(prompt))
    finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
    token = torch.full((num_samples,), feed[0], dtype=torch.long, device=device)
    for position, prompt_token in enumerate(feed[1:]):  # feed <cls> and the prompt
        with autocast:
            _, states = step_logits(model, token, position, states)
        token = torch.full_like(token, prompt_token)
    for position in range(len(feed) - 1, len(feed) - 1 + max_length - len(prefix)):
        with autocast:
            logits, states = step_logits(model, token, position, states)
        logits = filter_logits(logits.float() / temperature + allowed, top_k, top_p)
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
        finished |= token == alphabet.eos_idx
        out = torch.cat([out, token.masked_fill(finished, alphabet.eos_idx)[:, None]], dim=1)
        if bool(finished.all()):  # the one host read per step (the positions and states never leave the device)
            break
    rows = out.tolist()  # one transfer for all samples
    return [alphabet.decode(t for t in row if t != alphabet.eos_idx) for row in rows]


def write_fasta(path: str | Path, records: list[tuple[str, str]], width: int = 60) -> Path:
    """Write ``(header, sequence)`` records as FASTA via a temp file + rename (no half-written files)."""
    text = "".join(f">{header}\n" + "".join(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
                   for header, seq in records)
    return write_text_atomic(path, text)
