"""The wheel installs and runs without the checkout: built from the sources (``scripts/make_wheelhouse.py``'s
``build_wheel``), installed with ``--no-index`` into a fresh venv, it carries its configs, trains from an empty
directory, says in one line what to set when no data is there, and runs ``pp-gpu-check --quick``.

The fresh venv finds the dependencies in this interpreter's site-packages through a ``.pth`` line: a plain path, so
the editable install's own finder there is never run and the wheel's copy is the one imported (checked).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from proteinperformer.files import CONFIG_DIR
from tests.conftest import ROOT


def _load_make_wheelhouse():
    spec = importlib.util.spec_from_file_location("make_wheelhouse", ROOT / "scripts" / "make_wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_wheelhouse = _load_make_wheelhouse()


class Installed:
    """A fresh venv with the project's wheel in it; ``run`` runs one of its commands from an empty directory."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.root, self.wheel = root, wheel
        self.venv = root / "venv"
        self.bin = self.venv / "bin"

    def run(self, cwd: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        return subprocess.run([str(self.bin / cmd[0]), *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel, built once, installed once into a venv without pip of its own (this pip's ``--python``), offline."""
    root = tmp_path_factory.mktemp("wheel")
    inst = Installed(root, make_wheelhouse.build_wheel(root / "dist", isolation=False))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(inst.venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(inst.venv), "platbase": str(inst.venv)}))
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])  # lib64 on some systems
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))  # searched after the venv's own
    # --no-index: the dependencies must all be met from site-packages (the resolver fails otherwise)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(inst.bin / "python"), "install", "--quiet",
                           "--no-index", str(inst.wheel)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inst


def _fasta_gz(path: Path, n: int = 2000) -> Path:
    """``n`` random sequences: enough batches for experiment=tiny (validation every 100 steps)."""
    rng = random.Random(0)
    with gzip.open(path, "wt") as f:
        for i in range(n):
            f.write(f">seq{i}\nM{''.join(rng.choices('ACDEFGHIKLMNPQRSTVWY', k=rng.randint(30, 120)))}\n")
    return path


def test_the_checkout_reaches_its_configs_through_the_package() -> None:
    """In a checkout (editable install, PYTHONPATH) the package's conf/ is a link to the top-level conf/."""
    assert CONFIG_DIR == ROOT / "proteinperformer" / "conf" and CONFIG_DIR.is_symlink()
    assert CONFIG_DIR.resolve() == ROOT / "conf" and (CONFIG_DIR / "experiment" / "tiny.yaml").is_file()


def test_the_wheel_carries_the_configs_and_is_what_runs(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert "proteinperformer/conf/train.yaml" in names and "proteinperformer/conf/experiment/tiny.yaml" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "data/", "conf/")) or "__pycache__" in n]
    code = "import proteinperformer.files as f; print(f.__file__); print(f.CONFIG_DIR.is_symlink())"
    proc = installed.run(installed.root / "empty", "python", "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, link = proc.stdout.split()
    assert Path(module).is_relative_to(installed.venv) and link == "False"  # the wheel's copy, a real folder


def test_pp_train_runs_from_an_empty_directory(installed: Installed) -> None:
    fasta = _fasta_gz(installed.root / "seqs.fasta.gz")
    work = installed.root / "train"
    proc = installed.run(work, "pp-train", "experiment=tiny", "trainer.max_steps=2", f"data.fasta_path={fasta}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics,) = work.glob("runs/tiny/*/metrics.json")
    assert json.loads(metrics.read_text())["global_step"] == 2
    assert list(metrics.parent.glob("checkpoints/*.ckpt"))


def test_pp_train_without_data_says_what_to_set(installed: Installed) -> None:
    proc = installed.run(installed.root / "nodata", "pp-train", "experiment=tiny", "trainer.max_steps=2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.fasta_path" in errors[0], proc.stderr[-2000:]


def test_pp_gpu_check_quick_runs_from_the_wheel(installed: Installed) -> None:
    work = installed.root / "gpu_check"
    proc = installed.run(work, "pp-gpu-check", "--quick", "--out", "report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((work / "report" / "gpu_check.json").read_text())
    assert set(report["sections"]) == {"tests", "train", "bench"}
    assert all(section["ok"] for section in report["sections"].values())
    assert report["sections"]["train"]["fasta_source"].startswith("synthetic")  # no data/ here


def test_wheelhouse_leaves_out_only_the_nodes_torch_and_cuda_stack() -> None:
    names = ["torch", "nvidia-cublas-cu12", "NVIDIA_cudnn_cu12", "triton", "cuda-bindings", "numpy",
             "pytorch-lightning", "torchmetrics", "sympy"]
    kept = make_wheelhouse.keep([{"metadata": {"name": n, "version": "1.0"}} for n in names])
    assert [i["metadata"]["name"] for i in kept] == ["numpy", "pytorch-lightning", "torchmetrics", "sympy"]
    tags = make_wheelhouse.platforms("2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and {"manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and "manylinux_2_16_x86_64" not in tags
