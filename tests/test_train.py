"""Training configs at scale: experiment presets, trainer options, loggers, checkpoints and throughput."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from proteinperformer.training.callbacks import TrainingDiverged
from proteinperformer.training.train import train
from tests.conftest import ROOT, tiny_config


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("name", ["paper_bid_1024", "paper_uni_1024", "paper_concat8192"])
def test_paper_presets_match_the_paper(name: str) -> None:
    cfg = _compose([f"experiment={name}"])
    m = cfg.model.config
    assert (m.dim, m.depth, m.heads, m.ff_dim, m.positions) == (512, 6, 8, 2048, "learned")
    assert (cfg.model.lr, cfg.model.weight_decay, list(cfg.model.betas)) == (1e-3, 0.1, [0.9, 0.98])
    assert cfg.trainer.gradient_clip_val == 0.5 and cfg.model.config.attention == "favor"
    assert cfg.task_name == ("clm" if name == "paper_uni_1024" else "mlm") and m.causal == (cfg.task_name == "clm")
    if name == "paper_concat8192":
        assert (cfg.data.mode, cfg.data.chunk_len, m.max_positions, cfg.data.batch_size) == ("concat", 8192, 8192, 8)
    else:
        assert (cfg.data.mode, cfg.data.max_len, m.max_positions) == ("single", 1024, 1024)
    if name == "paper_bid_1024":  # building one 19M-parameter model is enough
        lm = hydra.utils.instantiate(cfg.model, _convert_="all")
        assert 18e6 < lm.model.num_parameters() < 20e6  # 6 × (4·512² + 2·512·2048) + positions


def test_trainer_options(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = _compose(["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.precision) == ("gpu", "bf16-mixed")
    ddp = _compose(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.num_nodes, ddp.use_distributed_sampler) == ("ddp", 4, 2, False)
    fsdp = hydra.utils.instantiate(_compose(["trainer=fsdp"]).trainer.strategy)
    assert type(fsdp).__name__ == "FSDPStrategy"
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    slurm = _compose(["trainer=slurm"]).trainer
    assert (slurm.devices, slurm.num_nodes, slurm.strategy) == (4, 3, "ddp")
    assert _compose(["experiment=tiny"]).trainer.accelerator == "cpu"


def test_tiny_run_logs_checkpoints_and_throughput(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard + wandb (offline, no account) + CSV; periodic, best and last checkpoints; tokens/s."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, [
        "experiment=tiny", "logger=[tensorboard,wandb]", "trainer.max_steps=8", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=2", "data.max_sequences=300",
        "callbacks.periodic_checkpoint.every_n_train_steps=3", "callbacks.throughput.log_every_n_steps=2",
    ])
    metrics = train(cfg)

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert {"step3.ckpt", "step6.ckpt", "last.ckpt"} <= set(names) and "last-v1.ckpt" not in names, names
    # training ended between two periodic saves (6 and 9): last.ckpt still holds the final state
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert metrics["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert any(n.startswith("step8-ppl") or n.startswith("step4-ppl") for n in names), names
    assert metrics["global_step"] == 8 and Path(metrics["best_checkpoint"]).exists()

    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    rates = [float(r["perf/tokens_per_sec"]) for r in rows if r.get("perf/tokens_per_sec")]
    assert len(rates) == 4 and all(r > 0 for r in rates)
    assert any(r.get("lr-AdamW/pg1") for r in rows), "LearningRateMonitor logs the learning rate"
    assert "model" in (tmp_path / "csv" / "hparams.yaml").read_text(), "the run config is logged as hparams"

    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline, "wandb runs offline by default, without an account"
    record = next(offline[0].glob("run-*.wandb")).read_bytes()  # offline runs keep the config in this record
    assert b"proteinperformer.training.lm.ProteinLM" in record, "the run config is logged to wandb as hyper-parameters"


@pytest.mark.parametrize(
    "content,expected",
    [(">sp|P1|A_HUMAN x\nMKV1LL\n", "bad.fasta:1: record 'P1' invalid character '1' at residue 4 (line 2)"),
     ("", "bad.fasta"), (None, "no such file")],
    ids=["bad-character", "empty-file", "missing-file"],
)
def test_bad_input_stops_with_a_message_not_a_traceback(tmp_path: Path, content: str | None, expected: str) -> None:
    fasta = tmp_path / "bad.fasta"
    if content is not None:
        fasta.write_text(content)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=tiny", f"data.fasta_path={fasta}",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


class Diverge(pl.Callback):
    """Turn every weight into NaN after each optimizer step, as a diverged (e.g. fp16-overflowed) run would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                p.fill_(float("nan"))


def test_diverged_weights_stop_the_run_in_one_line(tmp_path: Path) -> None:
    """Weights turned NaN (as an fp16 overflow would): the run used to finish and report val_ppl = nan; now it stops
    in one line naming the step (issue 33), and no checkpoint with non-finite weights is written."""
    overrides = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                 f"+callbacks.diverge._target_={__name__}.Diverge"]
    with pytest.raises(TrainingDiverged, match="training diverged: the weights are not finite at step 3") as err:
        train(tiny_config(tmp_path, overrides))
    assert "\n" not in str(err.value) and "model.lr" in str(err.value)
    for ckpt in tmp_path.rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("task", ["mlm", "clm"])
@pytest.mark.parametrize("model", ["performer_relu", "performer_softmax", "transformer"])
def test_table2_runs_differ_only_in_attention_and_task(task: str, model: str) -> None:
    """The Table-2 sweep compares attentions at one size, recipe and budget: the reference's optimiser and
    masking, the study's data and time budget."""
    cfg = _compose(["experiment=table2", f"task={task}", f"model={model}"])
    recipe, reference = _compose(["experiment=recipe"]), _compose(["experiment=reference"])
    m = cfg.model.config
    assert (m.dim, m.depth, m.heads, m.ff_dim, m.positions) == (128, 4, 4, 512, "sinusoidal")
    assert m.causal == (task == "clm") and cfg.task_name == task
    assert m.attention == ("exact" if model == "transformer" else "favor")
    if model != "transformer":  # the ReLU default has no projection, softmax needs one
        assert m.use_projection == (model == "performer_softmax")
    for key in ("lr", "warmup_steps", "weight_decay"):
        assert cfg.model[key] == reference.model[key]
    assert cfg.data.mask_prob == reference.data.mask_prob
    assert (cfg.data.fasta_path, cfg.data.max_len, cfg.data.eval_max_len) == (
        recipe.data.fasta_path, recipe.data.max_len, recipe.data.eval_max_len)
    assert cfg.trainer.max_time == recipe.trainer.max_time and cfg.callbacks.periodic_checkpoint.save_top_k == -1


def test_reference_presets() -> None:
    """experiment=reference is the study's base with its winners and a full schedule on CPU; reference_gpu the
    same recipe, larger, on one GPU in bf16 with an 8-minute budget, reading the ≤ 40 MB subset written by
    scripts/subset_fasta.py."""
    recipe, ref, gpu = (_compose([f"experiment={n}"]) for n in ("recipe", "reference", "reference_gpu"))
    assert ref.trainer.accelerator == "cpu" and ref.trainer.max_steps < 10_000
    assert ref.model.config == recipe.model.config and ref.data.max_len == recipe.data.max_len
    assert (ref.model.lr, ref.model.warmup_steps, ref.data.mask_prob) == (4e-3, 25, 0.3)  # the study's winners
    assert (gpu.trainer.accelerator, gpu.trainer.precision) == ("gpu", "bf16-mixed")
    assert gpu.trainer.max_time == "00:00:08:00"
    assert gpu.model.lr == ref.model.lr and gpu.data.mask_prob == ref.data.mask_prob
    assert gpu.model.config.dim > ref.model.config.dim and gpu.data.batch_size > ref.data.batch_size
    assert gpu.data.fasta_path == "data/swissprot_gpu.fasta.gz"


def test_subset_fasta_keeps_a_prefix_of_records_under_the_size_limit(tmp_path: Path) -> None:
    from proteinperformer.data import load_fasta
    from proteinperformer.tokenizer import Alphabet

    src = ROOT / "data" / "uniprot_sample20k.fasta.gz"
    dst = tmp_path / "subset.fasta.gz"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "subset_fasta.py"), str(src), str(dst),
                          "--max-mb", "1"], capture_output=True, text=True, check=True)
    assert "records" in out.stdout and not list(tmp_path.glob("*.tmp"))
    assert 0.8e6 < dst.stat().st_size <= 1e6
    kept, full = load_fasta(dst, Alphabet()), load_fasta(src, Alphabet())
    assert 1000 < len(kept) < len(full)
    assert [(r.id, r.sequence) for r in kept] == [(r.id, r.sequence) for r in full[: len(kept)]]
