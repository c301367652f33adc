"""``pp-train`` / ``scripts/train.py``: compose ``conf/train.yaml`` (shipped in the package) with Hydra overrides
and train.

    pp-train experiment=tiny                        # the README's first run, from the checkout's root
    pp-train data.fasta_path=my.fasta trainer=gpu   # any config key can be overridden

Relative paths (``data.fasta_path``, ``init_from``, the run folder ``runs/...``) are read from the current directory.

Bad input (a FASTA error, a bad or unsafe checkpoint in ``init_from=`` / ``ckpt_path=``, a precision this
machine cannot run) ends in one line ``error: ...`` and exit code 1; set ``PP_DEBUG=1`` for the traceback
(Hydra owns the command line, so there is no ``--debug`` flag here). Lightning's banners (GPU/TPU available),
tips, model table and third-party deprecation warnings are off; ``verbose=true`` shows them.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proteinperformer.cli.common import anticipated_errors, one_line
from proteinperformer.files import CONFIG_DIR

if TYPE_CHECKING:
    from omegaconf import DictConfig


def check_overrides(overrides: Sequence[str]) -> None:
    """Compose ``conf/train.yaml`` with the command line's ``key=value`` overrides before Hydra runs: a key the
    config lacks (a typo such as ``trainer.max_step=5``) ends in one line naming it and the closest keys, instead
    of Hydra's seven lines whose ``+key`` suggestion then fails inside the Trainer. Sweeps (``-m``) and Hydra's own
    flags and keys are left to Hydra."""
    if any(o.startswith("-") for o in overrides):
        return
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            compose("train", overrides=plain)
            return
        except ConfigCompositionException as err:
            found = re.search(r"Could not override '([^']+)'", str(err))
            if not found:  # e.g. an unknown experiment=: Hydra lists the options, then its search path
                raise SystemExit(f"error: {one_line(err).split(' Config search path')[0]}") from None
            key = found.group(1)
        bad = next(o for o in plain if o.split("=", 1)[0] == key)
        parent, _, leaf = key.rpartition(".")
        try:
            cfg = compose("train", overrides=[o for o in plain if o != bad])
        except ConfigCompositionException:
            cfg = None
    close: list[str] = []
    if cfg is not None:
        node = OmegaConf.select(cfg, parent) if parent else cfg
        siblings = list(node.keys()) if hasattr(node, "keys") else []
        close = [f"{parent + '.' if parent else ''}{k}" for k in difflib.get_close_matches(leaf, siblings, 3, 0.6)]
        close = close or difflib.get_close_matches(key, _dotted_keys(OmegaConf.to_container(cfg)), 3, 0.75)
    hint = f"did you mean {' or '.join(close)}?" if close else "pp-train --cfg job prints every key"
    raise SystemExit(f"error: {bad}: the config has no key {key}; {hint}")


def _dotted_keys(node: object, prefix: str = "") -> list[str]:
    """Every key of a nested dict as ``a.b.c``."""
    if not isinstance(node, dict):
        return []
    return [k for key, value in node.items() for k in [prefix + str(key), *_dotted_keys(value, f"{prefix}{key}.")]]


def run(cfg: DictConfig) -> float | None:
    """Train from the composed config; returns validation perplexity for sweeps."""
    from proteinperformer.training.train import train  # here, not at the top: --help answers without torch

    try:
        return train(cfg)["val_ppl"]
    except anticipated_errors() as err:
        if os.environ.get("PP_DEBUG"):
            raise
        # Bad input: the message names the file, line and record; a traceback would only bury it.
        raise SystemExit(f"error: {one_line(err)}") from None


def help_text() -> str:
    """``pp-train --help``: the usage, the config groups and their options (the files under ``conf/``) and
    ``conf/train.yaml`` with its comments. Read from the files, as Hydra's own help composes every group (seconds)."""
    groups: dict[str, list[str]] = {}
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        if path.parent != CONFIG_DIR:
            groups.setdefault(path.parent.relative_to(CONFIG_DIR).as_posix(), []).append(path.stem)
    lines = [__doc__.strip(), "", "Config groups (group=option):"]
    lines += [f"  {group}: {', '.join(options)}" for group, options in groups.items()]
    lines += ["", "conf/train.yaml (override any key: key=value; add one: +key=value):", "",
              (CONFIG_DIR / "train.yaml").read_text().rstrip(), "",
              "The composed config: pp-train [overrides] --cfg job. Hydra's own options: pp-train --hydra-help."]
    return "\n".join(lines)


def main() -> float | None:
    """Console entry point ``pp-train``: Hydra composes ``conf/train.yaml`` with the command-line overrides."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(help_text())
        return None
    check_overrides(sys.argv[1:])
    import hydra

    return hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
