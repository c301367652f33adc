"""Faults of long runs (issue 33): divergence, SIGTERM, resume from one path, damaged stores, killed preprocessing,
full disks and read-only places. Each fault must end in one line naming what happened and what is kept, leave
nothing that looks complete, and let the same command (or ``ckpt_path=``) continue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from proteinperformer.cli import convert as convert_cli
from proteinperformer.cli import embed as embed_cli
from proteinperformer.cli import preprocess as preprocess_cli
from proteinperformer.data.store import StoreError, TokenStore
from proteinperformer.files import CONFIG_DIR
from proteinperformer.training.callbacks import TrainingDiverged
from proteinperformer.training.resume import ResumeMismatch
from proteinperformer.training.train import train
from tests.conftest import ROOT, SAMPLE_FASTA, tiny_config
from tests.test_resume import LossRecorder

WEIGHTS = ROOT / "weights" / "pp_mlm_relu_2.7M.ckpt"
FAST = ["data.max_sequences=150", "trainer.max_steps=12", "trainer.val_check_interval=6",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=3",
        "callbacks.periodic_checkpoint.every_n_train_steps=4", "model.config.dropout=0.1"]


class PoisonWeights(pl.Callback):
    """After optimizer step ``step``, one weight matrix becomes NaN (what a diverging run looks like)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.ndim == 2).fill_(float("nan"))


class PoisonGradients(pl.Callback):
    """The gradients of optimizer step ``step`` are NaN (a bf16 overflow in the backward pass)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 == self.step:
            next(p for p in pl_module.parameters() if p.ndim == 2).grad.fill_(float("nan"))


class SigtermAt(pl.Callback):
    """Send this process SIGTERM when the batch after optimizer step ``step`` starts (as SLURM preempts)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _callback(name: str, cls: type, **kwargs) -> list[str]:
    return [f"+callbacks.{name}._target_={__name__}.{cls.__name__}",
            *(f"+callbacks.{name}.{k}={v}" for k, v in kwargs.items())]


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _all_finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# ---- divergence --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("every", "found"), [(4, "the weights are not finite at step 6"),
                                              (100, "the loss is nan at step 9")], ids=["at-save", "at-log"])
def test_divergence_stops_in_one_line_and_keeps_finite_checkpoints(tmp_path: Path, every: int, found: str) -> None:
    # poisoned after step 6: the validation's save at 6 is refused, or (no save) the loss logged at 9 is NaN
    cfg = tiny_config(tmp_path, [*FAST, f"callbacks.periodic_checkpoint.every_n_train_steps={every}",
                                 f"trainer.val_check_interval={6 if every == 4 else 12}",
                                 *_callback("poison", PoisonWeights, step=6)])
    with pytest.raises(TrainingDiverged, match=found) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and "model.lr" in message and "gradient_clip_val" in message
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    if every == 4:  # the step-4 state is kept and named; the step-6 save was refused
        assert {p.name for p in ckpts} == {"step4.ckpt", "last.ckpt"} and "last.ckpt" in message
        assert torch.load(ckpts[0], weights_only=True)["global_step"] == 4
    assert all(_all_finite(p) for p in ckpts)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("skips", [0, 1])
def test_non_finite_gradients_stop_or_are_skipped(tmp_path: Path, skips: int) -> None:
    cfg = tiny_config(tmp_path, [*FAST, "trainer.max_steps=6", f"callbacks.divergence.max_skipped_steps={skips}",
                                 *_callback("poison", PoisonGradients, step=3)])
    if skips == 0:
        with pytest.raises(TrainingDiverged, match="the gradient norm is nan at step 3"):
            train(cfg)
        return
    metrics = train(cfg)  # step 3's update is dropped, the run goes on with finite weights
    assert metrics["global_step"] == 6 and np.isfinite(metrics["val_ppl"])
    assert _all_finite(Path(metrics["last_checkpoint"]))


# ---- SIGTERM and resume from one path ------------------------------------------------------------------------
def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_sigterm_saves_last_ckpt_and_ckpt_path_alone_resumes_the_run(tmp_path: Path) -> None:
    """SIGTERM at step 8 saves last.ckpt; ``ckpt_path=`` alone (no model/data/trainer override repeated) resumes
    to the straight run's losses; a resume with no validation inside whose remembered best file is gone still
    writes metrics.json; settings that contradict the checkpoint fail in one line naming both."""
    straight = train(tiny_config(tmp_path / "a", [*FAST, *_callback("rec", LossRecorder, path=tmp_path / "a.jsonl")]))
    with pytest.raises(SystemExit, match=r"stopped by SIGTERM at step 8; saved .*last.ckpt; resume with ckpt_path="):
        train(tiny_config(tmp_path / "b", [*FAST, *_callback("rec", LossRecorder, path=tmp_path / "b1.jsonl"),
                                           *_callback("term", SigtermAt, step=7)]))
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8

    cfg = _compose([f"ckpt_path={last}", *_callback("rec", LossRecorder, path=tmp_path / "b2.jsonl")])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "b")
    metrics = train(cfg)
    resumed, reference = _losses(tmp_path / "b2.jsonl"), _losses(tmp_path / "a.jsonl")
    assert sorted(resumed) == list(range(9, 13)) and metrics["global_step"] == 12
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), f"step {step}"
    assert metrics["val_ppl"] == pytest.approx(straight["val_ppl"], rel=1e-5)

    # last.ckpt remembers a best checkpoint that is gone and the resumed steps hold no validation: the run still
    # ends normally, with metrics.json (the final weights validated)
    Path(metrics["best_checkpoint"]).unlink()
    cfg = _compose([f"ckpt_path={last}", "trainer.max_steps=14"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "b")
    metrics = train(cfg)
    assert metrics["global_step"] == 14 and metrics["best_checkpoint"] == ""
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["global_step"] == 14

    for override, both in (("model.config.dim=64", "model.config.dim=32, this run has model.config.dim=64"),
                           ("task=clm", "is a task=mlm run, this run has task=clm")):
        with pytest.raises(ResumeMismatch, match=both):
            train(_compose([f"ckpt_path={last}", override]))


# ---- token stores ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_fasta(tmp_path_factory) -> Path:
    """The first 3000 records of the bundled sample (~1.3 MB of FASTA)."""
    import gzip

    path = tmp_path_factory.mktemp("fasta") / "sample.fasta"
    with gzip.open(SAMPLE_FASTA, "rt") as f:
        lines = f.read().split("\n>")[:3000]
    path.write_text("\n>".join(lines) + "\n")
    return path


def _store_args(fasta: Path, out: Path) -> list[str]:
    return [str(fasta), "--out", str(out), "--chunk-mb", "0.1", "--quiet"]


def _checksums(store: Path) -> tuple:
    manifest = json.loads((store / "manifest.json").read_text())
    return manifest["counts"], [s["checksums"] for s in manifest["shards"]], manifest["index_checksums"]


def test_verify_names_damaged_files_and_training_refuses_a_truncated_shard(tmp_path: Path, sample_fasta, capsys):
    store = tmp_path / "store"
    preprocess_cli.main(_store_args(sample_fasta, store))
    preprocess_cli.main(["--verify", str(store), "--quiet"])
    assert "intact" in capsys.readouterr().out
    shard = store / "shards" / "0000-000002"
    data = bytearray((shard / "tokens.npy").read_bytes())
    data[-3] = 200  # not a token id: also caught while reading
    (shard / "tokens.npy").write_bytes(bytes(data))
    cut = store / "shards" / "0000-000004" / "tokens.npy"
    os.truncate(cut, cut.stat().st_size // 2)  # half copied
    with pytest.raises(SystemExit, match="2 damaged or missing file"):
        preprocess_cli.main(["--verify", str(store), "--quiet"])
    err = capsys.readouterr().err
    assert "0000-000002/tokens.npy: checksum" in err and "0000-000004/tokens.npy: missing or unreadable" in err
    with pytest.raises(StoreError, match=r"0000-000004/tokens.npy: [\d,]+ bytes, the manifest needs"):
        TokenStore(store)  # what training does first (cheap: headers only)
    opened = TokenStore(store, check_sizes=False)
    last_row = int(sum(s["sequences"] for s in opened.manifest["shards"][:3])) - 1
    with pytest.raises(StoreError, match=r"0000-000002/tokens.npy: row \d+ is damaged"):
        opened.shards.row(last_row)
    # the same pp-preprocess command rebuilds the damaged shards: the store is as before
    reference = tmp_path / "ref"
    preprocess_cli.main(_store_args(sample_fasta, reference))
    (shard / "shard.json").unlink()  # content damage is invisible to sizes: drop the shard as --verify advises
    preprocess_cli.main(_store_args(sample_fasta, store))
    assert _checksums(store) == _checksums(reference)
    TokenStore(store).verify()


def test_sigkilled_preprocessing_reruns_to_the_same_store(tmp_path: Path, sample_fasta) -> None:
    reference, store = tmp_path / "ref", tmp_path / "store"
    preprocess_cli.main(_store_args(sample_fasta, reference))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "proteinperformer.cli.preprocess",
                             *_store_args(sample_fasta, store)], env=env)
    deadline = time.time() + 600  # (the child's imports can take long on a loaded machine)
    while time.time() < deadline and len(list((store / "shards").glob("0*"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    finished = len(list((store / "shards").glob("0*")))
    assert finished >= 1 and not (store / "manifest.json").exists(), "the kill must fall inside the parsing"
    preprocess_cli.main(_store_args(sample_fasta, store))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["run"]["shards_reused"] == finished  # every finished shard reused, the rest redone
    assert _checksums(store) == _checksums(reference)


# ---- full disks and read-only places -------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only: CI runs as root); skipped with the reason where mounting is refused."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): full-disk tests need root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _one_line_error(run, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as err:
        run(argv)
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_preprocess_on_a_full_disk_then_resumes(small_disk: Path, sample_fasta: Path, tmp_path: Path) -> None:
    store = small_disk / "store"
    message = _one_line_error(preprocess_cli.main, _store_args(sample_fasta, store))
    assert "no space left on device while writing" in message and str(store) in message
    assert not (store / "manifest.json").exists() and not list(store.rglob(".*.tmp*"))
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    preprocess_cli.main(_store_args(sample_fasta, store))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["run"]["shards_reused"] >= 1
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    message = _one_line_error(preprocess_cli.main, [*_store_args(sample_fasta, store), "--min-len", "50"])
    assert "read-only file system while writing" in message


@pytest.mark.parametrize("fmt", ["h5", "pt", "npz"])
def test_embed_on_a_full_disk(small_disk: Path, sample_fasta: Path, fmt: str) -> None:
    out = small_disk / "emb"
    message = _one_line_error(embed_cli.main, [str(WEIGHTS), str(sample_fasta), str(out), "--format", fmt,
                                               "--include", "mean", "per_tok", "--device", "cpu"])
    assert "no space left on device while writing" in message  # (h5: no segmentation fault)
    assert not list(out.glob("embeddings.*")) and not list(out.rglob(".*.tmp"))
    for done in out.glob("*.pt"):  # every per-sequence file is whole
        assert "representations" in torch.load(done, weights_only=True)


def test_convert_on_a_full_disk(small_disk: Path) -> None:
    message = _one_line_error(convert_cli.main, [str(WEIGHTS), str(small_disk / "conv.ckpt")])
    assert f"no space left on device while writing {small_disk / 'conv.ckpt'}" in message
    assert not list(small_disk.iterdir())


def test_checkpoints_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    run = small_disk / "run"
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # leave 64 KiB: a checkpoint needs more
    cfg = tiny_config(run, [*FAST, f"logger.csv.save_dir={tmp_path}"])  # the logger's own failure: test_one_line
    with pytest.raises(OSError, match=r"no space left on device while writing .*\.ckpt; nothing was written under "
                                      r"that name; free space and") as err:
        train(cfg)
    failed = Path(str(err.value).split(" while writing ")[1].split(";")[0])
    assert not failed.exists() and not list(failed.parent.glob(".*.tmp"))
    for kept in failed.parent.glob("*.ckpt"):  # whatever was written before is whole, and named in the message
        assert torch.load(kept, weights_only=True)["global_step"] == 4 and f"ckpt_path={kept}" in str(err.value)


def test_one_line_names_a_library_writers_full_disk() -> None:
    """A full disk met by a writer outside the package (Lightning's CSV logger) reads like the package's own."""
    from proteinperformer.cli.common import one_line

    err = OSError(28, "No space left on device", "runs/x/csv/metrics.csv")
    assert one_line(err) == ("no space left on device while writing runs/x/csv/metrics.csv; free space and rerun the "
                             "same command")


def test_score_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    """pp-score writes its CSV through the same atomic writer: one line, and no scored CSV that looks complete."""
    from proteinperformer.checkpoints import save_checkpoint
    from proteinperformer.cli import score as score_cli
    from tests.test_score import WT, _dms, tiny_model

    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.ckpt", "test")
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * free)  # nothing left
    out = small_disk / "scored.csv"
    message = _one_line_error(score_cli.main, [str(ckpt), str(_dms(tmp_path)), "--out", str(out), "--sequence", WT,
                                               "--offset-idx", "24", "--no-baselines", "--device", "cpu"])
    assert f"no space left on device while writing {out}" in message
    assert not out.exists() and not list(small_disk.glob(".*.tmp*"))
