"""Execute the notebooks in notebooks/ top to bottom and store them with their outputs (figures, tables, printed
numbers), so that they read on the repository page before anyone runs them.

    python scripts/run_notebooks.py                                   # all three, the shipped reference model
    python scripts/run_notebooks.py notebooks/01_attention_of_one_protein.ipynb      # one of them

Each runs as a user opens it (kernel python3, working directory notebooks/, ``PP_CHECKPOINT`` unset: the shipped
reference checkpoint, full size). The stored copy is cleaned: this machine's paths in the outputs become paths
relative to the repository, no execution timestamps, figures as PNG (``DPI`` dots per inch, at most ``MAX_WIDTH``
pixels wide, ``COLOURS`` colours); a notebook whose stored size would pass ``MAX_BYTES`` is refused. The file is
replaced atomically. tests/test_notebooks.py runs the notebooks too (in memory, smaller sizes) and checks the
stored outputs.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

from proteinperformer.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DPI = 72  # stored figures: PNG at this resolution (matplotlib's inline default)
MAX_WIDTH = 640  # wider figures are scaled down to this many pixels
COLOURS = 64  # and stored with a palette of this many colours (attention maps are noisy: full colour is 4x larger)
MAX_BYTES = 1_000_000  # a stored notebook larger than this is refused (keep the repository small)
SETUP = f"%config InlineBackend.figure_formats = ['png']\n%config InlineBackend.rc = {{'figure.dpi': {DPI}}}"


def scrub(text: str) -> str:
    """This machine's paths in an output, made relative: the repository becomes ``..`` (outputs are seen from
    notebooks/), the home folder ``~``."""
    return text.replace(str(NOTEBOOKS), ".").replace(str(ROOT), "..").replace(str(Path.home()), "~")


def compact_png(data: str) -> str:
    """A base64 PNG scaled to at most ``MAX_WIDTH`` pixels wide with a ``COLOURS``-colour palette (if smaller)."""
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.quantize(colors=COLOURS).save(out, "PNG", optimize=True)
    small = base64.b64encode(out.getvalue()).decode()
    return small if len(small) < len(data) else data


def execute(path: Path, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run ``path`` as a user would (PP_CHECKPOINT unset) and return it with cleaned outputs."""
    nb = nbformat.read(path, as_version=4)
    setup = nbformat.v4.new_code_cell(SETUP)
    nb.cells.insert(0, setup)  # figure format and resolution; removed again below
    env_before = os.environ.pop("PP_CHECKPOINT", None)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        if env_before is not None:
            os.environ["PP_CHECKPOINT"] = env_before
    nb.cells.pop(0)
    for number, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), start=1):
        cell.execution_count = number
        for output in cell.get("outputs", []):
            if "execution_count" in output:
                output["execution_count"] = number
            if "text" in output:
                output["text"] = scrub(output["text"])
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    output["data"][kind] = scrub(value)
                elif kind == "image/png":
                    output["data"][kind] = compact_png(value)
            if "image/png" in output.get("data", {}):
                output.get("metadata", {}).pop("image/png", None)  # the size of the original
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    args = parser.parse_args()
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        nb = execute(path.resolve())
        text = nbformat.writes(nb) + "\n"
        if len(text.encode()) > MAX_BYTES:
            sys.exit(f"error: {path}: {len(text.encode()):,} bytes with outputs (limit {MAX_BYTES:,}); make its "
                     "figures smaller")
        write_text_atomic(path, text)
        print(f"{path}: {time.perf_counter() - start:.0f} s, {len(text.encode()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
