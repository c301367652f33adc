"""The Trainer's accelerator / precision pair, checked on this machine before Lightning builds it.

Training precision is Lightning's (``trainer.precision``: ``32-true``, ``bf16-mixed``, ``16-mixed``,
``bf16-true``); what inference precisions mean is in :mod:`proteinperformer.model.precision`.
"""

from __future__ import annotations

import torch

from proteinperformer.model.precision import PrecisionError, check_cuda, check_cuda_bf16, cpu_autocast_works

GPU_ACCELERATORS = ("gpu", "cuda")


def check_trainer(accelerator: str, precision: str | int, devices: int | str | list = 1) -> None:
    """Check a Trainer's accelerator/precision pair on this machine before Lightning builds it.

    Raises :class:`PrecisionError` for: a GPU accelerator without CUDA (or fewer GPUs than ``devices``), bf16 on
    a GPU without bfloat16, fp16 on a CPU torch cannot autocast to, and ``16-true`` (pure fp16 weights: AdamW's
    eps=1e-8 underflows in fp16 and the loss is NaN from the first step; measured here).
    """
    precision = str(precision)
    if precision in ("16", "16-true"):
        raise PrecisionError("trainer.precision=16-true keeps the weights and optimiser state in float16, where "
                             "AdamW diverges (NaN loss at step 1); use 16-mixed or bf16-mixed")
    if accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available()):
        check_cuda(devices)
        if precision.startswith("bf16"):
            check_cuda_bf16("trainer.precision=16-mixed (or 32-true)")
    elif accelerator == "cpu" and precision.startswith("16") and not cpu_autocast_works(torch.float16):
        raise PrecisionError("this torch build cannot autocast to float16 on the CPU; "
                             "use trainer.precision=bf16-mixed or 32-true")
