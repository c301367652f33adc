"""What every ``pp-*`` command shares, so that they behave alike (the table is in docs/cli.md; the test
``tests/test_cli_conventions.py`` builds every parser and checks it).

- Options are spelled with dashes (``--max-length``); the underscore spelling (``--max_length``, as in
  esm-extract) is accepted everywhere and means the same option.
- One name for one idea: ``--out`` (what a command writes), ``--max-sequences`` (use at most N input sequences),
  ``--crop-length`` (crop longer sequences) vs ``--max-length`` (skip longer ones; for pp-generate: stop there),
  ``--repr-layers``, ``--device``, ``--precision``, ``--attention`` / ``--kernel`` / ``--num-features``,
  ``--threads``, ``--seed``, ``--quiet``, ``--debug``. Old spellings stay for one release as hidden aliases
  (:meth:`Parser.deprecated`) that print a one-line note.
- ``--device`` takes a torch device string (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``), default ``auto``.
- Anticipated errors (a bad or unsafe checkpoint, a bad FASTA or CSV, a bad option, an unsupported precision or
  device) end in one line ``error: ...`` on stderr that names the file and what to do, with exit code 1 and no
  traceback; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from proteinperformer.files import write_failure_message
from proteinperformer.options import DEVICE_CHOICES, FEATURES, INFERENCE_PRECISIONS, KERNELS

if TYPE_CHECKING:
    import torch


def anticipated_errors() -> tuple[type[BaseException], ...]:
    """The errors that end in one line: ValueError covers CheckpointError, TokenizationError, FastaFormatError,
    PrecisionError, ProbeDataError and pandas' parser errors; OSError covers missing, unreadable and corrupt (gzip)
    files; StoreError a bad token store. A function, called in ``except``, so that a command's parser (``--help``)
    imports nothing heavy: the store module is loaded only when an error is being handled."""
    from proteinperformer.data.store import StoreError

    return (ValueError, OSError, EOFError, zlib.error, StoreError)


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


class _Deprecated(argparse.Action):
    """An old spelling kept for one release: stores into the new option's ``dest`` and prints a one-line note."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string or self.dest} is deprecated and goes in the next release; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


LEGACY_OUT = "legacy_out"  # the dest of a hidden positional OUTPUT kept for one release (see Parser.add_out)


class Parser(argparse.ArgumentParser):
    """argparse with the conventions above: underscore spellings of long options, ``--debug``, ``--quiet``, hidden
    deprecated aliases, and a one-line ``error: ...`` (exit 1) for a bad option instead of the usage block
    (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
        self.add_argument("--quiet", action="store_true", help="no progress bars")
        self._out_required = False

    def deprecated(self, old: str, new: str) -> None:
        """Accept ``old`` (hidden from --help) as the option ``new`` added before, with a one-line note."""
        action = self._option_string_actions[new]
        self.add_argument(old, action=_Deprecated, new=new, dest=action.dest, type=action.type, nargs=action.nargs,
                          choices=action.choices, metavar=action.metavar)

    def add_out(self, help: str, required: bool = False, default: Any = None, positional: bool = False) -> None:
        """``--out``: what the command writes. ``positional``: the OUTPUT positional of earlier releases is still
        accepted (hidden, with a note) after the other positionals."""
        self.add_argument("--out", type=Path, default=default, help=help + (" (required)" if required else ""))
        self._out_required = required  # checked after parsing: the old positional may give it instead
        if positional:
            self.add_argument(LEGACY_OUT, type=Path, nargs="?", default=None, help=argparse.SUPPRESS)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        ns, rest = super().parse_known_args([_dashed(a) for a in args[:end]] + args[end:], namespace)
        legacy = getattr(ns, LEGACY_OUT, None)
        if legacy is not None:
            if ns.out is not None and ns.out != self.get_default("out"):
                self.error(f"give the output once: --out {ns.out} or {legacy}, not both")
            print(f"note: the output as a positional argument is deprecated and goes in the next release; use "
                  f"--out {legacy}", file=sys.stderr)
            ns.out = legacy
        if hasattr(ns, LEGACY_OUT):
            delattr(ns, LEGACY_OUT)
        if self._out_required and getattr(ns, "out", None) is None:
            self.error("the following arguments are required: --out")
        return ns, rest

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def summary(doc: str) -> str:
    """A command's --help description: the first paragraph of its module docstring without the leading
    ``pp-name``: (``\"\"\"``pp-contacts``: can the model's attention ...`` -> ``can the model's attention ...``)."""
    first = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r"^``[\w-]+``( / ``[^`]+``)?:\s*", "", first)
    return text[:1].upper() + text[1:]


def check_output_file(path: Path, example: str = "out.csv") -> None:
    """Fail before any work when ``--out`` names a folder but the command writes one file."""
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder; give --out a file path, e.g. {Path(path) / example}")


def add_device_arguments(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--device``, ``--threads`` (and ``--precision``), the same on every command that runs a model."""
    parser.add_argument("--device", default="auto", help=f"torch device: {DEVICE_CHOICES}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 when other jobs share the cores, where "
                        "two threads per core run several times slower)")
    if precision:
        parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="32",
                            help="32, or run the model under autocast in bf16 / 16 (fp16) for speed and memory")


def add_attention_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--attention``, ``--num-features``, ``--kernel``, ``--features``: swap a model's attention at load time
    (weights kept), the same on every command that runs a model for its outputs (``default`` None keeps the
    file's attention)."""
    parser.add_argument("--attention", choices=("exact", "favor"), default=default,
                        help="exact softmax, or favor = FAVOR+ (linear memory, no length cap, e.g. an ESM-2 file on "
                        "a 35,000-residue protein)" + ("" if default else "; default: as in the file"))
    parser.add_argument("--num-features", type=int, default=None, help="FAVOR+ random features per head (256)")
    parser.add_argument("--kernel", choices=KERNELS, default=None,
                        help="FAVOR+ kernel (default: softmax for a file trained with exact attention, else the "
                        "checkpoint's own; hedgehog: Hedgehog's learned map, made by pp-convert --transfer)")
    parser.add_argument("--features", choices=FEATURES, default=None,
                        help="FAVOR+ feature map of the softmax kernel: favor+, or FAVOR++ oprf / oprf-rescaled / "
                        "oprf-dense (keeps the most), "
                        "which need a checkpoint calibrated by pp-convert --calibrate (default: the checkpoint's own)")


def checked_device(args: argparse.Namespace) -> torch.device:
    """The torch device of ``args.device``, checked on this machine together with ``args.precision`` (if any)."""
    from proteinperformer.model.precision import check_inference_precision, resolve_device

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
    quiet = getattr(args, "quiet", False)
    if quiet:
        os.environ["PP_QUIET"] = "1"  # proteinperformer.progress: no bars, no periodic lines
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return run(args)
    except anticipated_errors() as err:
        if getattr(args, "debug", False):
            raise
        raise SystemExit(f"error: {one_line(err)}") from None
    finally:
        if quiet:
            os.environ.pop("PP_QUIET", None)
