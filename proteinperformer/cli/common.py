"""What every ``pp-*`` command shares, so that they behave alike.

- Options are spelled with dashes (``--max-length``); the underscore spelling (``--max_length``, as in
  esm-extract) is accepted everywhere and means the same option.
- ``--device`` takes a torch device string (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``), default ``auto``.
- Anticipated errors (a bad or unsafe checkpoint, a bad FASTA or CSV, a bad option, an unsupported precision or
  device) end in one line ``error: ...`` on stderr that names the file and what to do, with exit code 1 and no
  traceback; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from proteinperformer.data.store import StoreError
from proteinperformer.files import write_failure_message
from proteinperformer.model.precision import (
    DEVICE_CHOICES,
    INFERENCE_PRECISIONS,
    check_inference_precision,
    resolve_device,
)

# ValueError covers CheckpointError, TokenizationError, FastaFormatError, PrecisionError, ProbeDataError and
# pandas' parser errors; OSError covers missing, unreadable and corrupt (gzip) files.
ANTICIPATED_ERRORS = (ValueError, OSError, EOFError, zlib.error, StoreError)


def _dashed(arg: str) -> str:
    """``--max_length=5`` -> ``--max-length=5``; anything that is not a long option stays as it is."""
    if not arg.startswith("--") or len(arg) == 2:
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless its help already says it, or there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing_to_show = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or nothing_to_show or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the conventions above: underscore spellings of long options, ``--debug``, and a one-line
    ``error: ...`` (exit 1) for a bad option instead of the usage block (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        return super().parse_known_args([_dashed(a) for a in args[:end]] + args[end:], namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def add_device_arguments(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--device`` (and ``--precision``), the same on every command that runs a model."""
    parser.add_argument("--device", default="auto", help=f"torch device: {DEVICE_CHOICES}")
    if precision:
        parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="32",
                            help="32, or run the model under autocast in bf16 / 16 (fp16) for speed and memory")


def checked_device(args: argparse.Namespace) -> torch.device:
    """The torch device of ``args.device``, checked on this machine together with ``args.precision`` (if any)."""
    device = resolve_device(args.device)
    check_inference_precision(getattr(args, "precision", "32"), device)
    return device


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (tracebacks and multi-line library messages are for --debug)."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = write_failure_message(err) or text  # a full disk / refused write in a library's writer: one wording
    if isinstance(err, FileNotFoundError) and err.filename:  # "[Errno 2] No such file or directory: 'x'"
        text = f"{err.filename}: no such file or directory"
    return text


def run_command(run: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
                argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` and call ``run(args)``; an anticipated error becomes ``error: ...`` and exit code 1."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ANTICIPATED_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        raise SystemExit(f"error: {one_line(err)}") from None
