# syntax=docker/dockerfile:1
# orch on NVIDIA GPUs: the image of every node of a GPU cluster (KubeRay pods, or `docker run --gpus all`).
#
#   docker build -t YOUR-REGISTRY/orch:0.1.0-cuda .
#   docker push YOUR-REGISTRY/orch:0.1.0-cuda
#
# The project goes in as the wheel the first stage builds (conf/ inside it), into a virtual
# environment owned by root, and everything runs as the unprivileged user `orch` (uid 1000).
# CUDA_IMAGE and TORCH_INDEX go together: the torch wheels of that CUDA version.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

FROM python:3.12-slim-bookworm AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.3.0 setuptools==80.9.0
COPY pyproject.toml README.md ./
COPY orchestrator orchestrator
COPY model model
RUN python -m build --wheel --no-isolation --outdir /dist

FROM ${CUDA_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# GPU architectures DeepSpeed's fused Adam and CPU Adam are compiled for, once, here (A100, A10/L4, H100)
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/orch PATH=/opt/orch/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3.12 is Ubuntu 24.04's; g++ and libaio for DeepSpeed's ops; wget for KubeRay's probes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ libaio-dev wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/orch
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install "setuptools>=70.1" "ninja>=1.11" "packaging>=24"   # DeepSpeed's build, without isolation
COPY --from=wheel /dist /tmp/dist
# DeepSpeed's GPU ops compiled now, not by every worker at start (DS_BUILD_*); the range is orch's.
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
        pip install --no-build-isolation "deepspeed>=0.16,<0.20" \
    && pip install /tmp/dist/orch-*.whl \
    && rm -rf /tmp/dist \
    && python -c "import torch, ray, deepspeed, orchestrator.conf; print('torch', torch.__version__, 'ray', ray.__version__)"
# The image's user `orch`, uid 1000 (Ubuntu's own `ubuntu` makes way), by number so Kubernetes'
# runAsNonRoot can check it; KubeRay pods run as it (fsGroup 1000 owns their volumes).
RUN (userdel -r ubuntu 2>/dev/null || true) && useradd --create-home --uid 1000 --shell /bin/bash orch
USER 1000:1000
WORKDIR /home/orch
CMD ["orch", "--help"]
