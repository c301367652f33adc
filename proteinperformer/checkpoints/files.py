"""Reading and writing checkpoint files safely: no code runs on load, no half-written file on save.

Every checkpoint this package reads goes through :func:`read_torch` (``torch.load(weights_only=True)``, with
fair-esm's ``argparse.Namespace`` as the only extra allowed class), and every one it writes through
:func:`save_atomic` (temp file + rename). Failures raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import json
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from proteinperformer.files import write_atomic

# what a plain-pickle checkpoint may import without running code of its own (containers, tensors, fair-esm's cfg)
SAFE_GLOBALS = {"argparse.Namespace", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                "torch._utils._rebuild_parameter", "torch.Size", "torch.device", "_codecs.encode"}


class CheckpointError(ValueError):
    """A file is not a readable checkpoint of a supported kind; the message names the file and what is wrong."""


def read_torch(path: str | Path) -> object:
    """torch.load with weights_only=True and argparse.Namespace (fair-esm's cfg) as the only allowed class.

    Raises :class:`CheckpointError` for a file that is not a torch file (random bytes, truncated) or that
    holds pickled objects outside the allow-list (a pickle that would run code is refused, not run).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" + _where_esm_keeps(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a plain pickle (not torch's zip format) is refused below in one line; torch's warning would add two
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or truncated file
        text = str(err)
        refused = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)  # torch names only the last part
        if refused:
            unsafe = [n for n in _pickled_globals(path) if n.rsplit(".", 1)[-1] in refused] or refused
        else:  # a plain pickle: torch stops at its first unsupported opcode, before reading what it imports
            unsafe = [] if zipfile.is_zipfile(path) else _pickled_globals(path)
        if unsafe:
            raise CheckpointError(f"{path}: holds pickled objects outside the allow-list (tensors, dicts, argparse."
                                  f"Namespace): {', '.join(unsafe[:3])}; refusing to run code from it") from None
        with open(path, "rb") as handle:
            zip_start = handle.read(2) == b"PK"
        if zip_start and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a readable torch checkpoint; truncated: a torch (zip) archive "
                                  f"without its end, {path.stat().st_size:,} bytes (an interrupted copy or "
                                  "download?); copy it again") from None
        detail = next((line.strip() for line in text.splitlines() if "Unsupported operand" in line),
                      text.split("\n")[0].split(". ")[0])  # a whole first sentence, never cut in the middle
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt "
                              f"({type(err).__name__}: {detail or 'empty file'}); copy it again") from None


def _where_esm_keeps(path: Path) -> str:
    """For a missing fair-esm file name (``esm2_t6_8M_UR50D.pt``): where fair-esm keeps the files it downloads."""
    if not re.match(r"esm\w*_t\d+_\w+\.pt$", path.name):
        return ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / path.name
    if cached.is_file():
        return f"; fair-esm downloaded it to {cached}: give that path"
    return (f"; fair-esm keeps the files it downloads in {cached.parent}/ (esm.pretrained.{path.stem}() fetches "
            "it there; nothing is downloaded here)")


def _pickled_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """The classes and functions a (non-zip) pickle file would import, found by reading its opcodes without
    executing them (``pickletools``); empty for a file that is not a pickle. torch's weights-only unpickler
    stops at an unsupported opcode before naming them, so this names what the file would have run."""
    names: list[str] = []
    strings: list[str] = []
    try:
        if zipfile.is_zipfile(path):  # torch's format: the pickle is <archive>/data.pkl
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(member)[:limit]
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle (random bytes, text): nothing it would import
        pass
    return [n for n in dict.fromkeys(names) if n not in SAFE_GLOBALS]


def save_atomic(obj: object, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` through a temp file + rename (readers never see a partial file)."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def read_hf_weights(directory: Path, error: type[CheckpointError] = CheckpointError,
                    ) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """(state dict as stored, files read) of a Hugging Face model directory: ``model.safetensors``, sharded
    safetensors with their index, or ``pytorch_model.bin`` (read without running code). Problems raise ``error``."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (directory / "pytorch_model.bin").is_file():
        files = [directory / "pytorch_model.bin"]
    else:
        raise error(f"{directory}: config.json but no weights; expected model.safetensors, "
                    "model.safetensors.index.json with its shards, or pytorch_model.bin")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                raw.update(load_file(f))
            except (SafetensorError, OSError, ValueError) as err:
                raise error(f"{f}: not a readable safetensors file; truncated or corrupt? ({err})") from None
        else:
            data = read_torch(f)
            if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
                raise error(f"{f}: expected a state dict of tensors")
            raw.update(data)
    return raw, files
