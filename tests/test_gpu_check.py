"""pp-gpu-check: without CUDA it says what it skipped and exits 0; --quick runs its mechanics on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proteinperformer.cli.gpu_check import synthetic_fasta, training_fasta
from proteinperformer.data.fasta import load_fasta
from tests.conftest import ROOT


def _check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "proteinperformer.cli.gpu_check", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_everything_is_skipped_and_said(tmp_path: Path) -> None:
    proc = _check(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for section in ("tests", "train", "bench"):
        assert f"skipped {section}: no CUDA device" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["skipped"]) == {"tests", "train", "bench"} and report["sections"] == {}
    assert "**bench: skipped**" in (tmp_path / "gpu_check.md").read_text()


def test_quick_mode_runs_the_mechanics_on_cpu(tmp_path: Path) -> None:
    proc = _check(tmp_path, "--quick", "--sections", "tests", "bench")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    tests = report["sections"]["tests"]
    assert tests["ok"] and tests["passed"] == len(tests["checks"]) == 28 and tests["failed"] == 0
    kinds = {c["name"].split()[0] for c in tests["checks"]}
    assert kinds == {"forward/backward", "padding", "prefix", "decoding", "packed"}
    bench = report["sections"]["bench"]["runs"][0]
    assert bench["longest"] == {"exact": 256, "favor_causal": 256}
    assert all(r["finite"] and r["seconds"] > 0 for r in bench["results"])
    assert "| favor_causal |" in (tmp_path / "gpu_check.md").read_text()


def test_training_data_is_the_flag_the_default_or_synthetic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the checkout's root: the configured sample is there
    path, source = training_fasta(None, tmp_path, quick=True)
    assert path == ROOT / "data" / "uniprot_sample20k.fasta.gz" and "data.fasta_path" in source
    mine = synthetic_fasta(tmp_path / "mine.fasta", 3)
    assert training_fasta(mine, tmp_path, quick=True) == (mine.resolve(), "--fasta")
    with pytest.raises(ValueError, match="nope.fasta: no such FASTA file"):
        training_fasta(tmp_path / "nope.fasta", tmp_path, quick=True)
    monkeypatch.chdir(tmp_path)  # elsewhere: random sequences, and the report says so
    path, source = training_fasta(None, tmp_path / "out", quick=True)
    records = load_fasta(path)
    assert path == tmp_path / "out" / "synthetic.fasta" and source.startswith("synthetic") and len(records) == 400
    assert all(r.sequence[0] == "M" and 50 <= len(r.sequence) <= 800 for r in records)
