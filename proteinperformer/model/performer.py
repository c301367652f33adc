"""The Performer protein language model: a pre-LayerNorm Transformer stack whose attention is FAVOR+.

One stack serves both tasks: bidirectional (masked LM, like the paper's "BID" models) and causal
(autoregressive LM, "UNI"); ``ModelConfig.causal`` decides. Attention is chosen per config between
exact softmax (torch SDPA, the "Transformer" baseline) and FAVOR+ with softmax or ReLU kernels, all
implemented in ``proteinperformer.attention``. Shapes: B batch, T tokens, D model width, V vocabulary.

References: Choromanski et al. 2020 ("Masked Language Modeling for Proteins via Linearly Scalable
Long-Context Transformers") and 2021 ("Rethinking Attention with Performers"); the layout (learned
positions, pre-LN, tied LM head) follows google-research/protein_lm and karpathy/nanoGPT.

ESM-2 (Lin et al. 2023) is the same pre-LN stack with rotary positions (``positions="rotary"``), LayerNorm
eps 1e-5, an LM head with a dense + GELU + LayerNorm transform (``lm_head_dense``), token dropout
(``token_dropout``) and its own vocabulary (``alphabet="esm"``); ``proteinperformer.checkpoints.esm`` loads its
checkpoints into this class, with exact or FAVOR+ attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from proteinperformer.attention import MultiheadSelfAttention
from proteinperformer.attention.documents import check_cu_seqlens, document_positions
from proteinperformer.attention.features import feature_map
from proteinperformer.attention.oprf import convert_moments
from proteinperformer.tokenizer import Alphabet

POSITIONS = ("learned", "sinusoidal", "rotary")
FEATURE_BUFFERS = ("attn.feature_moments", "attn.feature_pairs", "attn.feature_a", "attn.feature_psi",
                   "attn.feature_dense")
TOKEN_DROPOUT_TRAIN_RATIO = 0.15 * 0.8  # ESM-2's masking rate x <mask> share, hard-coded in esm2.py


@dataclass
class ModelConfig:
    """Architecture of a :class:`PerformerLM`; saved in every checkpoint so the model can be rebuilt."""

    vocab_size: int = 32  # 30 real tokens padded to a multiple of 8 (see tokenizer.py)
    dim: int = 512  # paper / reference protein_lm: 512
    depth: int = 6
    heads: int = 8
    ff_dim: int = 2048
    positions: str = "learned"  # "learned" (paper; caps length at max_positions), "sinusoidal" or "rotary" (no cap)
    max_positions: int = 1024  # size of the learned position table = longest input such a model accepts
    attention: str = "favor"  # "favor" (Performer) or "exact" (Transformer baseline, torch SDPA)
    kernel: str = "relu"  # FAVOR+ kernel: "relu" (paper's best protein model) or "softmax"
    # softmax kernel: "favor+" (positive random features), "oprf" / "oprf-rescaled" (FAVOR++, calibrated A and Ψ per
    # layer × head; "oprf-dense": full matrix and key shift), see attention/oprf.py and model/calibration.py;
    # configs saved before it existed mean "favor+"
    features: str = "favor+"
    num_features: int = 256  # m random features per head (reference default)
    orthogonal: bool = True  # orthogonal random features (lower variance than iid)
    use_projection: bool = True  # relu kernel only: False = relu(x) + 1e-3 with no projection (reference)
    causal: bool = False  # True for autoregressive (CLM) models
    dropout: float = 0.0
    padding_idx: int | None = None  # None = the alphabet's <pad> id; any other value must equal it
    # tokenizer.Alphabet: "proteinperformer", "esm" (ESM-2's ids) or a token list (GPT-2 imports: their vocab.txt)
    alphabet: str | list[str] = "proteinperformer"
    layer_norm_eps: float = 1e-5
    lm_head_dense: bool = False  # ESM-2 / RoBERTa LM head: dense + GELU + LayerNorm before the tied decoder
    token_dropout: bool = False  # ESM-2: zero <mask> embeddings, rescale by (1 - 0.12) / (1 - observed mask ratio)
    contact_head: bool = False  # ESM-2's logistic regression over all attention maps (analysis.contacts.ContactHead)
    activation: str = "gelu"  # MLP: "gelu" (erf, BERT/ESM) or "gelu_new" (tanh approximation, GPT-2 / IgLM)
    # favor only: the attention's feature parameters were trained to mimic the exact model's attention
    # (attention transfer, ``model.transfer``; pp-convert --transfer); they are then kept, never redrawn
    transferred: bool = False
    # favor, causal, softmax kernel: exact softmax over each query's last W keys, FAVOR features for older ones (one
    # normaliser; LoLCATs' sliding-window hybrid, attention/window.py); 0 = plain FAVOR (configs saved before it: 0)
    attention_window: int = 0

    def __post_init__(self) -> None:
        # Every special id the model uses (padding here, <mask> for token dropout) comes from the alphabet: a
        # padding_idx of 0 with alphabet="esm" (where 0 is <cls>) would treat <cls> as padding and freeze its
        # embedding, so a config that disagrees with its alphabet is refused rather than trained.
        alphabet = Alphabet(self.alphabet)
        pad = alphabet.padding_idx
        if self.padding_idx is None:
            self.padding_idx = pad
        elif self.padding_idx != pad:
            raise ValueError(f"padding_idx={self.padding_idx} disagrees with the {alphabet.name!r} alphabet, whose "
                             f"<pad> id is {pad}; leave model.config.padding_idx unset (it follows the alphabet)")

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoidal_positions(
    length: int, dim: int, device=None, dtype=torch.float32, start: int = 0
) -> torch.Tensor:
    """Fixed sin/cos position encodings (Vaswani et al. 2017) of positions start..start+length-1: [length, dim]."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh"}  # name -> F.gelu's approximate argument


class MLP(nn.Module):
    def __init__(self, dim: int, ff_dim: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc = nn.Linear(dim, ff_dim)
        self.proj = nn.Linear(ff_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.approximate = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = MultiheadSelfAttention(
            cfg.dim,
            cfg.heads,
            attention=cfg.attention,
            kernel=cfg.kernel,
            num_features=cfg.num_features,
            orthogonal=cfg.orthogonal,
            use_projection=cfg.use_projection,
            causal=cfg.causal,
            dropout=cfg.dropout,
            rotary=cfg.positions == "rotary",
            features=cfg.features,
            transferred=cfg.transferred,
            window=cfg.attention_window,
        )
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ff_dim, cfg.dropout, cfg.activation)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask, cu_seqlens, positions)
        return x + self.mlp(self.norm2(x))


class LMHeadTransform(nn.Module):
    """ESM-2's (RoBERTa's) transform before the tied decoder: LayerNorm(GELU(dense(x)))."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(x)))


class PerformerLM(nn.Module):
    """Token embedding + positions -> ``depth`` blocks -> final LayerNorm -> (transform) -> tied LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.alphabet = Alphabet(cfg.alphabet)
        if len(self.alphabet) > cfg.vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the {cfg.alphabet!r} alphabet "
                             f"({len(self.alphabet)} tokens)")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.padding_idx)
        if cfg.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {cfg.positions!r}")
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.dim) if cfg.positions == "learned" else None
        # Sin/cos values are O(1) while token embeddings start at std 0.02: unscaled, position drowns identity
        # and MLM stalls at the unigram baseline (measured). A learned gain, started at the embedding scale,
        # fixes that (as x-transformers' ScaledSinusoidalEmbedding).
        self.position_scale = nn.Parameter(torch.tensor(0.02)) if cfg.positions == "sinusoidal" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.lm_transform = LMHeadTransform(cfg.dim, cfg.layer_norm_eps) if cfg.lm_head_dense else None
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)
        self.lm_head.weight = self.embed_tokens.weight  # weight tying, as BERT/ESM/nanoGPT
        self.contact_head = nn.Linear(cfg.depth * cfg.heads, 1) if cfg.contact_head else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct trainable parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def embed(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token + position embeddings: LongTensor [B, T] -> [B, T, D] (the layer-0 representation).

        With ``token_dropout`` (ESM-2) the ``<mask>`` embeddings are zeroed and each row is scaled by
        (1 − 0.15·0.8) / (1 − its share of ``<mask>`` among non-padding tokens), in training and inference.
        Packed documents (``cu_seqlens``, tokens [1, T]): positions restart and token dropout counts per document.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        x = self.embed_tokens(tokens)
        rows = None  # packed: each token's document, so per-row quantities become per-document ones
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, tokens.shape[1], tokens.shape[0])
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=tokens.device, dtype=torch.int64)
            rows = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths)
        if self.config.token_dropout:
            if padding_mask is None:
                padding_mask = tokens == self.config.padding_idx
            is_mask = tokens == self.alphabet.mask_idx
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            if rows is None:
                observed = is_mask.sum(-1).to(x.dtype) / (~padding_mask).sum(-1).clamp_min(1)
                x = x * (1 - TOKEN_DROPOUT_TRAIN_RATIO) / (1 - observed)[:, None, None]
            else:
                n = len(lengths)
                masked = torch.zeros(n, device=x.device).index_add_(0, rows, is_mask[0].float())
                real = torch.zeros(n, device=x.device).index_add_(0, rows, (~padding_mask[0]).float())
                observed = (masked / real.clamp_min(1)).to(x.dtype)
                x = x * (1 - TOKEN_DROPOUT_TRAIN_RATIO) / (1 - observed)[rows][None, :, None]
        if self.config.positions == "rotary":  # positions enter attention as rotations of q and k
            return self.dropout(x)
        if cu_seqlens is not None:
            return self.dropout(x + self.document_position_embedding(cu_seqlens, x.dtype))
        return self.dropout(x + self.position_embedding(0, tokens.shape[1], x.dtype))

    def document_position_embedding(self, cu_seqlens: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Position embeddings of packed documents, restarting at 0 in each: [T, D] (T = ``cu_seqlens[-1]``)."""
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        table = self.position_embedding(0, longest, dtype)  # checks the learned table's cap
        return table[document_positions(cu_seqlens, table.device)]

    def position_embedding(self, start: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What is added to the token embeddings at positions start..start+length-1: [length, D]."""
        device = self.embed_tokens.weight.device
        if self.config.positions == "rotary":
            return torch.zeros(length, self.config.dim, device=device, dtype=dtype)
        if self.embed_positions is None:
            return self.position_scale.to(dtype) * sinusoidal_positions(length, self.config.dim, device, dtype, start)
        if start + length > self.config.max_positions:
            raise ValueError(
                f"input of {start + length} tokens exceeds the model's max_positions={self.config.max_positions} "
                "(learned positions); crop the sequence or use a model with positions='sinusoidal'"
            )
        return self.embed_positions.weight[start : start + length].to(dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        repr_layers: tuple[int, ...] | list[int] = (),
        cu_seqlens: torch.Tensor | None = None,
    ) -> dict:
        """Run the model.

        Args:
            tokens: LongTensor [B, T].
            padding_mask: bool [B, T], True at padding (default: ``tokens == padding_idx``).
            repr_layers: which hidden states to return; 0 = embeddings, i = output of block i, and
                ``depth`` is the final (LayerNorm'ed) representation, as in ESM.
            cu_seqlens: packed proteins, as flash-attention's varlen functions take them: tokens [1, T] hold n
                proteins back to back (each framed as ``BatchConverter`` frames it), ``cu_seqlens`` (n + 1,) int32
                their offsets from 0 to T. Each protein gets exactly the outputs it gets alone: attention stays
                inside it and positions restart at 0 (``attention/documents.py``).
        Returns:
            ``{"logits": [B, T, V], "representations": {layer: [B, T, D]}}``.
        """
        if padding_mask is None:
            padding_mask = tokens == self.config.padding_idx
        # The mask is always passed on, also when it holds no padding: testing for that would read the device from
        # the host (a sync per step on a GPU, and a torch.compile graph break); FAVOR+ masks at the cost of one
        # masked_fill, so no fast path is lost there.
        kpm = padding_mask
        if cu_seqlens is not None and not bool(padding_mask.any()):
            kpm = None  # a packed stream holds no padding (cu_seqlens is read on the host anyway): no masking cost
        wanted = {layer % (self.config.depth + 1) for layer in repr_layers}
        reps: dict[int, torch.Tensor] = {}
        x = self.embed(tokens, padding_mask, cu_seqlens)
        positions = None
        if cu_seqlens is not None and self.config.positions == "rotary":
            positions = document_positions(cu_seqlens, tokens.device)
        if 0 in wanted:
            reps[0] = x
        for i, block in enumerate(self.layers, start=1):
            x = block(x, kpm, cu_seqlens, positions)
            if i in wanted and i != self.config.depth:
                reps[i] = x
        x = self.final_norm(x)
        if self.config.depth in wanted:
            reps[self.config.depth] = x
        return {"logits": self.logits(x), "representations": reps}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """LM head on the final (LayerNorm'ed) representation: [..., D] -> [..., V]."""
        return self.lm_head(x if self.lm_transform is None else self.lm_transform(x))

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Resample the FAVOR+ projection of every attention layer (no-op for exact attention)."""
        for block in self.layers:
            block.attn.redraw_projection(generator)


def own_kernel(config: ModelConfig) -> str:
    """The FAVOR+ kernel that approximates what ``config``'s attention computes: its own kernel under FAVOR+,
    softmax under exact attention (whatever its unused ``kernel`` field says: a project config defaults to relu)."""
    return config.kernel if config.attention == "favor" else "softmax"


def convert_attention(
    model: PerformerLM,
    attention: str | None = None,
    num_features: int | None = None,
    kernel: str | None = None,
    seed: int = 0,
    features: str | None = None,
    window: int | None = None,
) -> PerformerLM:
    """The same network with another attention: every weight is copied, only the FAVOR+ projections are new.

    Swapping exact softmax attention for FAVOR+ (``attention="favor"``, kernel "softmax") is the Performer's
    backward compatibility: the trained q/k/v weights stay and φ(q)·φ(k) estimates their softmax kernel. The
    new projections are drawn from ``seed`` (reproducible), also for a source that has none (exact attention, or
    the ReLU kernel without projection). ``features`` (options.FEATURES: "favor+", "oprf", ...) switches the softmax
    kernel's feature map: calibration statistics the model holds are kept and give the new map's A and Ψ (a
    model without them gets zero statistics, i.e. FAVOR+, until ``calibrate_features``). Arguments left None keep
    the model's value, except the kernel of a model with exact attention, which is softmax (:func:`own_kernel`);
    the result is on the model's device, in eval mode if the model was. ``window``: the sliding-window hybrid's W
    (``ModelConfig.attention_window``; None keeps the model's). A transferred model
    (``config.transferred``) asked for its own attention, kernel, features and feature count keeps its trained
    features; any other conversion drops them (``transferred=False``, a fresh draw).
    """
    cfg = replace(model.config, attention=attention or model.config.attention,
                  num_features=num_features or model.config.num_features, kernel=kernel or own_kernel(model.config),
                  features=features or model.config.features,
                  attention_window=model.config.attention_window if window is None else window)
    keep = cfg == model.config and cfg.transferred  # the trained features stay only where they still fit
    cfg = replace(cfg, transferred=keep)
    if cfg.attention == "favor" and feature_map(cfg.kernel).needs_projection:
        cfg = replace(cfg, use_projection=True)  # positive random features need ω; a source without one gets a draw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = PerformerLM(cfg)
    fresh = new.state_dict()
    state = {k: v for k, v in model.state_dict().items() if keep or not is_feature_key(k)}
    state.update({k: v for k, v in fresh.items() if not keep and is_feature_key(k)})
    new.load_state_dict(state, strict=True)
    for old_block, new_block in zip(model.layers, new.layers, strict=True):
        if not keep and new_block.attn.features != "favor+" and old_block.attn.features != "favor+":
            moments = convert_moments(old_block.attn.feature_moments, new_block.attn.features)
            if moments is not None:  # diagonal statistics cannot give oprf-dense's: it stays uncalibrated
                new_block.attn.set_feature_moments(moments, old_block.attn.feature_pairs)
    device = next(model.parameters()).device
    return new.to(device).train(model.training)


FEATURE_KEYS = ("attn.projection", "attn.feature_scale", "attn.feature_weight", *FEATURE_BUFFERS)  # key endings


def is_feature_key(key: str) -> bool:
    """True for the state-dict keys of the attention's feature map (projection, FAVOR++ statistics, trained Ψ and
    W): all that :func:`convert_attention` draws or calibrates and attention transfer trains; every other weight is
    the source's."""
    return key.endswith(FEATURE_KEYS)
