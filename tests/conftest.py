"""Shared fixtures: compose the real Hydra config (shrunk for CPU) and a tiny trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from proteinperformer.files import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FASTA = ROOT / "data" / "uniprot_sample20k.fasta.gz"

TINY_OVERRIDES = [
    "data.max_sequences=600",
    "data.max_len=96",
    "data.batch_size=8",
    "data.valid_frac=0.1",
    "model.config.dim=32",
    "model.config.depth=2",
    "model.config.heads=2",
    "model.config.ff_dim=64",
    "model.config.num_features=16",
    "model.warmup_steps=5",
    "trainer.max_steps=30",
    "trainer.val_check_interval=15",
    "trainer.limit_val_batches=4",
    "trainer.enable_model_summary=false",
]


def tiny_config(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """The package's train.yaml with TINY_OVERRIDES + ``overrides``, writing into ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_OVERRIDES, *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a tiny MLM Performer trained for 30 steps by the real train() (built once)."""
    from proteinperformer.training.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    metrics = train(tiny_config(out, ["model.config.positions=sinusoidal"]))
    return Path(metrics["best_checkpoint"] or metrics["last_checkpoint"])


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    """Each compiling test starts from an empty torch.compile cache: after another test compiled the same FAVOR+
    code with other shapes, dynamo marks them dynamic, and tracing the causal kernel's backward symbolically takes
    many minutes (sympy)."""
    if "compile" in request.node.name:
        import torch._dynamo

        torch._dynamo.reset()
    yield
