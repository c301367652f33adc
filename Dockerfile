# GPU image: the official PyTorch CUDA runtime with the torch version CI tests (constraints-cpu.txt: 2.13.0), plus
# this package installed from its wheel (built in the first stage), not an editable checkout. CUDA 12.6 runs on
# drivers >= 560 (and older 12.x drivers through CUDA's compatibility); the cuda13.0 tag needs driver >= 580.
# Build: docker build -t proteinperformer .
# Train: docker run --gpus all --rm -v $PWD/runs:/work/runs proteinperformer      # experiment defaults on data/
#        docker run --gpus all --rm -v /data:/data -v $PWD/runs:/work/runs proteinperformer \
#            pp-train experiment=paper_bid_1024 trainer=gpu data.fasta_path=/data/uniref50.fasta.gz
# Check: docker run --gpus all --rm -v $PWD/gpu_check:/work/gpu_check proteinperformer pp-gpu-check --out gpu_check
ARG BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY conf ./conf
# proteinperformer/conf is a symlink to ../conf: COPY keeps it a link, and the wheel gets the files
COPY proteinperformer ./proteinperformer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE}
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline
COPY --from=build /wheels /wheels
# torch is already in the base image and satisfies the requirement, so pip keeps its CUDA build.
RUN pip install /wheels/proteinperformer-*.whl && rm -rf /wheels
# the bundled sample, probe sets, structures and the reference weights, so that the default paths work from /work
WORKDIR /work
COPY data ./data
COPY weights ./weights

CMD ["pp-train", "trainer=gpu"]
