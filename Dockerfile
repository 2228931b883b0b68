# CPU image of the pipeline: `docker build -t robustkd .` then
#   docker run --rm -v /path/to/cifar10:/home/robustkd/shared/datasets/cifar10:ro robustkd   (make run)
# GPU image (or `docker compose build pipeline-gpu`): a CUDA base and the compiler and Python headers
# that Triton needs to build its kernels (without them torch.compile's probe fails, and the fast path
# falls back to eager):
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg BUILD_PACKAGES="gcc g++ python3-dev" -t robustkd:cuda .
#   docker run --rm --gpus all --ipc=host -v /path/to/cifar10:/home/robustkd/shared/datasets/cifar10:ro robustkd:cuda
# The install step is the README's (`make setup`, docs/development.md#installation), with torch
# taken from the PyTorch index so that torchvision matches it. Images cannot be built on the machines this project was written on:
# keep this file's install steps the same as the README's.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# C compiler for torch.compile (inductor's C++ kernels on CPUs; Triton's launcher on GPUs, which also
# needs the headers of the Python that runs it: python3-dev on the CUDA base)
ARG BUILD_PACKAGES="gcc g++ libc6-dev"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

# make and git (DVC needs a git repository); python3-venv for CUDA bases without it; BUILD_PACKAGES.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git ca-certificates python3 python3-venv ${BUILD_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 robustkd
WORKDIR /home/robustkd/app
COPY --chown=robustkd:robustkd . .
USER 1000

# The README's setup (make setup), with the PyTorch CPU (or CUDA) index for torch.
# mlartifacts: the MLflow server's artifact folder in docker-compose.yml (a named volume takes this owner).
RUN make setup TORCH_INDEX=${TORCH_INDEX} \
    && mkdir -p /home/robustkd/mlartifacts \
    && git init -q && git add -A \
    && git -c user.email=robustkd@localhost -c user.name=robustkd commit -qm image

# params.yaml's data.root (../shared/datasets/cifar10, an ImageFolder tree) is mounted at
# /home/robustkd/shared/datasets/cifar10; or set data.source: cifar10 to download CIFAR-10.
ENV PATH=/home/robustkd/app/.venv/bin:$PATH
EXPOSE 8080
CMD ["make", "run"]
