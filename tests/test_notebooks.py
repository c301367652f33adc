"""The biologist notebooks run top to bottom, as a user opens them (on the shipped reference checkpoint),
and report sensible numbers; PP_CHECKPOINT points them at any other checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REFERENCE = NOTEBOOKS.parent / "weights" / "pp_mlm_relu_2.7M.ckpt"


def run_notebook(name: str, env: dict[str, str]) -> dict:
    """Execute notebooks/<name> (kernel python3, cwd notebooks/) and return the JSON its last cell prints.

    Without PP_CHECKPOINT in ``env`` the notebook uses its default, the shipped reference checkpoint.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {"PP_CHECKPOINT": "", **env}  # "" = unset for the notebook: the user's own variable must not leak in
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["reference", "PP_CHECKPOINT"])
def test_attention_of_one_protein(which, tiny_checkpoint):
    env = {} if which == "reference" else {"PP_CHECKPOINT": str(tiny_checkpoint)}
    out = run_notebook("01_attention_of_one_protein.ipynb", env)
    assert out["checkpoint"] == (REFERENCE.name if which == "reference" else tiny_checkpoint.name)
    assert out["protein"].startswith("sp|P68871|") and out["length"] == 147
    assert out["row_sum_min"] == pytest.approx(1.0, abs=1e-4) and out["row_sum_max"] == pytest.approx(1.0, abs=1e-4)


def test_attention_vs_blosum62():
    out = run_notebook("02_attention_vs_blosum62.ipynb", {"PP_NB_PROTEINS": "8"})
    assert out["checkpoint"] == REFERENCE.name and out["n_proteins"] == 8
    for key in ("r_blosum62_weighted", "r_blosum62_weighted_untrained"):
        assert math.isfinite(out[key]) and -1 <= out[key] <= 1
    # Vig et al.'s method: r exists only when at least two heads keep >= 100 edges of weight >= 0.3
    assert out["n_heads"] == 36 and 0 <= out["vig_heads_kept"] <= 36
    assert (out["r_blosum62_vig"] is None) == (out["vig_heads_kept"] < 2)


def test_contacts_vs_structure():
    out = run_notebook("03_contacts_vs_structure.ipynb", {"PP_NB_CHAINS": "24"})
    assert out["checkpoint"] == REFERENCE.name and out["n_train"] == 20 and out["n_test"] == 4
    for rng in ("medium", "long"):
        for k in ("L", "L/2", "L/5", "background"):
            assert 0 <= out["precision"][rng][k] <= 1
        assert out["precision"][rng]["background"] > 0


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_stored_with_their_outputs(name):
    """What GitHub shows before anyone runs them (``python scripts/run_notebooks.py`` writes them): every code cell
    ran in order, the figures are there as PNG, no path of the machine that ran them, a modest size."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), name
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], name
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure stored"
    text = path.read_text()
    assert not re.search(r"(/home/|/root/|/tmp/|/work/|[A-Z]:\\\\Users)", text), f"{name}: a machine path"
    assert path.stat().st_size < 1_000_000, f"{name}: {path.stat().st_size:,} bytes"
