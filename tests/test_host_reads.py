"""The training step never reads a device tensor back to the host (each read is a device sync on a GPU, which
stops the CPU from queueing work ahead, and a torch.compile graph break): forward, backward and
ProteinLM.training_step run on a padded batch with every host read made to raise; the forward compiles as one
graph; decoding reads the device at most once per generated token."""

from __future__ import annotations

import contextlib

import pytest
import pytorch_lightning as pl
import torch

from proteinperformer.inference.generate import sample
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.training.lm import ProteinLM

HOST_READS = ("__bool__", "item", "__int__", "__float__", "tolist", "numpy")
TINY = {"dim": 32, "depth": 2, "heads": 2, "ff_dim": 64, "num_features": 16, "max_positions": 64}
CONFIGS = {
    "favor-relu": {"kernel": "relu"},
    "favor-softmax": {"kernel": "softmax"},
    "favor-relu-causal": {"kernel": "relu", "causal": True},
    "favor-softmax-causal": {"kernel": "softmax", "causal": True},
    "exact": {"attention": "exact"},
    "esm-rotary-token-dropout": {"kernel": "softmax", "alphabet": "esm", "vocab_size": 33, "positions": "rotary",
                                 "token_dropout": True, "lm_head_dense": True},
}


@contextlib.contextmanager
def host_reads(counter: list | None = None):
    """Make every Tensor -> host read raise (counter None) or count them (appended to counter)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def patched(name):
        def read(self, *args, **kwargs):
            if counter is None:
                raise AssertionError(f"host read Tensor.{name} of a {tuple(self.shape)} tensor")
            counter.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, patched(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _padded_batch(model: PerformerLM, lengths=(20, 13, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    a = model.alphabet
    tokens = torch.full((len(lengths), max(lengths)), a.padding_idx)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(0, len(a.residue_ids), (n,)).apply_(lambda i: a.residue_ids[i])
        tokens[row, 0] = a.cls_idx
    tokens[0, 3] = a.mask_idx
    return tokens, tokens == a.padding_idx


def test_host_read_guard_catches_reads() -> None:
    with host_reads(), pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(2).any())


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_forward_and_backward_read_nothing_from_the_device(config: dict) -> None:
    torch.manual_seed(0)
    model = PerformerLM(ModelConfig(**{**TINY, **config}))
    tokens, pad = _padded_batch(model)
    with host_reads():
        out = model(tokens, pad)["logits"]
        out.square().mean().backward()
        model(tokens)  # mask inferred from the tokens: no read either
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class _GuardedLM(ProteinLM):
    """ProteinLM whose training_step and backward run with host reads raising."""

    def training_step(self, batch, batch_idx):
        with host_reads():
            return super().training_step(batch, batch_idx)

    def backward(self, loss, *args, **kwargs):
        with host_reads():
            super().backward(loss, *args, **kwargs)


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_training_step_reads_nothing_from_the_device(task: str, tmp_path) -> None:
    from proteinperformer.data import CLMCollator, MLMCollator

    lm = _GuardedLM({**TINY, "causal": task == "clm"}, task=task)
    tokens, _ = _padded_batch(lm.model, lengths=(30, 17, 9, 4))
    items = [{"tokens": row[row != lm.alphabet.padding_idx], "seed": i} for i, row in enumerate(tokens)]
    batch = (MLMCollator if task == "mlm" else CLMCollator)(lm.alphabet)(items)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader([batch, batch], batch_size=None))
    assert trainer.global_step == 2


@pytest.mark.parametrize("config", ["favor-softmax-causal"])
def test_forward_compiles_to_one_graph(config: str) -> None:
    """torch.compile(fullgraph=True) traces the whole forward and backward (AOTAutograd; the aot_eager backend
    needs no C++ compiler on CI) and matches the eager result."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PerformerLM(ModelConfig(**{**TINY, **CONFIGS[config]}))
    tokens, pad = _padded_batch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(tokens, pad)["logits"]
    out.square().mean().backward()
    torch.testing.assert_close(out, model(tokens, pad)["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_generation_reads_the_device_at_most_once_per_token(attention: str) -> None:
    torch.manual_seed(0)
    lm = ProteinLM({**TINY, "causal": True, "attention": attention, "positions": "rotary"}, task="clm").eval()
    reads: list[str] = []
    with host_reads(reads):
        seqs = sample(lm.model, lm.alphabet, num_samples=4, max_length=30, prompt="MK", seed=0)
    steps = max(len(s) for s in seqs) - 2 + 1  # generated positions (the last may be <eos>)
    assert len(reads) <= steps + 2, (len(reads), steps)  # + the prompt's encoding and the final transfer


def test_throughput_counts_tokens_on_the_host_before_transfer() -> None:
    from proteinperformer.training.callbacks import ThroughputCallback

    lm = ProteinLM(TINY, task="mlm")
    tokens, pad = _padded_batch(lm.model)
    batch = lm.on_before_batch_transfer({"input_ids": tokens, "padding_mask": pad}, 0)
    assert batch["num_tokens"] == 20 + 13 + 7
    batch["padding_mask"] = None  # the count no longer looks at the (device) mask
    assert ThroughputCallback.count_tokens(batch) == 40
