"""scripts/gpu_check.py: without CUDA it says what it skipped and exits 0; --quick runs its mechanics on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT


def _check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


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
    assert tests["exit_code"] == 0 and tests["passed"] >= 4 and tests["failed"] == 0
    bench = report["sections"]["bench"][0]
    assert bench["longest"] == {"exact": 256, "favor_causal": 256}
    assert all(r["finite"] and r["seconds"] > 0 for r in bench["results"])
    assert "| favor_causal |" in (tmp_path / "gpu_check.md").read_text()
