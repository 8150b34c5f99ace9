# syntax=docker/dockerfile:1
# The rlhf-mesh image: every pod of helm/rlhf runs it (`rlhf serve ROLE`,
# `rlhf controller`, `rlhf sft`, `rlhf train-rm`, and `python -c` for the
# chart's init containers and `helm test`).
#
#   docker build -t ghcr.io/rlhf-mesh/rlhf-mesh:0.1.0 .
#
# Two stages: the CUDA *devel* image compiles DeepSpeed's fused Adam (the GPU
# optimizer the policy and value services use) ahead of time, so pods never
# JIT-compile with nvcc; the CUDA *runtime* image gets only the virtualenv.
# torch's CUDA must match CUDA_VERSION's major version: PyPI's torch 2.13 wheels
# are built for CUDA 13.0 (NVIDIA driver >= 580). For older drivers build e.g.
#   --build-arg CUDA_VERSION=12.8.1 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# with a TORCH_SPEC that index has.

ARG CUDA_VERSION=13.0.0
ARG UBUNTU_VERSION=22.04
ARG PYTHON_VERSION=3.11

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
ARG PYTHON_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Distribution packages follow the base image's release; they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python${PYTHON_VERSION} python${PYTHON_VERSION}-dev python${PYTHON_VERSION}-venv \
      build-essential ninja-build git \
 && rm -rf /var/lib/apt/lists/*
RUN python${PYTHON_VERSION} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The same order as `make install`: torch, then DeepSpeed built against it, then
# the project. torch's wheels bring cuDNN, NCCL and cuBLAS with them.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://pypi.org/simple
# hadolint ignore=DL3013
RUN pip install --upgrade pip setuptools wheel \
 && pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple "${TORCH_SPEC}"
# Ampere, Ada, Hopper and Blackwell (B200); add yours.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0"
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_FUSED_ADAM=1 \
    pip install --no-build-isolation "deepspeed>=0.16"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY services ./services
COPY controller ./controller
COPY training ./training
COPY demo ./demo
COPY bench ./bench
COPY cli ./cli
# `datasets` loads hub data sets (Dahoas/rm-static, ...) by id.
RUN pip install . datasets


FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
ARG PYTHON_VERSION
LABEL org.opencontainers.image.title="rlhf-mesh" \
      org.opencontainers.image.description="RLHF (SFT, reward model, PPO) as gRPC model services" \
      org.opencontainers.image.source="https://github.com/rlhf-mesh/rlhf-mesh"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python${PYTHON_VERSION} ca-certificates \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv

# A fixed non-root uid/gid (the chart's podSecurityContext runs as 1000:1000).
RUN groupadd --gid 1000 rlhf && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin rlhf
# Writable paths are volumes in the chart (read-only root filesystem): /tmp,
# the Hugging Face cache under /cache, /dev/shm, /checkpoints.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /tmp
# gRPC: controller 50050, policy 50051, reference 50052, reward 50053, value 50054;
# Prometheus metrics 9400-9404; torch.distributed 29500.
EXPOSE 50050-50054 9400-9404 29500
ENTRYPOINT ["rlhf"]
CMD ["--help"]
