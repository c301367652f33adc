# GPU image: the official PyTorch CUDA runtime (torch with CUDA already installed), plus this package.
# Build: docker build -t proteinperformer .
# Run:   docker run --gpus all --rm -v $PWD/runs:/app/runs proteinperformer \
#            python scripts/train.py trainer.accelerator=gpu trainer.precision=bf16-mixed
# Check: docker run --gpus all --rm -v $PWD/results:/app/results proteinperformer python scripts/gpu_check.py
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline

WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY proteinperformer ./proteinperformer
COPY conf ./conf
COPY scripts ./scripts
COPY data ./data
COPY checkpoints ./checkpoints
COPY tests ./tests
# torch is already in the base image (>=2.2 satisfies the requirement), so pip keeps its CUDA build.
RUN pip install -e ".[dev]"

CMD ["python", "scripts/train.py", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
