"""``pp-train`` / ``scripts/train.py``: compose ``conf/train.yaml`` (shipped in the package) with Hydra overrides
and train.

    pp-train experiment=tiny                        # the README's first run, from the checkout's root
    pp-train data.fasta_path=my.fasta trainer=gpu   # any config key can be overridden

Relative paths (``data.fasta_path``, ``init_from``, the run folder ``runs/...``) are read from the current directory.

Bad input (a FASTA error, a bad or unsafe checkpoint in ``init_from=`` / ``ckpt_path=``, a precision this
machine cannot run) ends in one line ``error: ...`` and exit code 1; set ``PP_DEBUG=1`` for the traceback
(Hydra owns the command line, so there is no ``--debug`` flag here).
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from proteinperformer.cli.common import ANTICIPATED_ERRORS, one_line
from proteinperformer.files import CONFIG_DIR
from proteinperformer.training.train import train


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns validation perplexity for sweeps."""
    try:
        return train(cfg)["val_ppl"]
    except ANTICIPATED_ERRORS as err:
        if os.environ.get("PP_DEBUG"):
            raise
        # Bad input: the message names the file, line and record; a traceback would only bury it.
        raise SystemExit(f"error: {one_line(err)}") from None


if __name__ == "__main__":
    main()
