# syntax=docker/dockerfile:1
# orch on NVIDIA GPUs: the image of every node of a GPU cluster (KubeRay pods, or `docker run --gpus all`).
#
#   docker build -t YOUR-REGISTRY/orch:0.1.0-cuda .
#   docker push YOUR-REGISTRY/orch:0.1.0-cuda
#
# The project goes in as the wheel the first stage builds (conf/ inside it), with its training stack
# (the `train` extra), into a virtual environment owned by root; everything runs as the unprivileged
# user `orch` (uid 1000). The GPU nodes need an NVIDIA driver of the R580 series or newer (CUDA 13).
#
# One CUDA version, one torch pin: CUDA_VERSION picks the base image (its nvcc compiles DeepSpeed's
# ops) *and* PyTorch's wheel index (cu130 for 13.0.x), so torch and nvcc always agree (DeepSpeed's
# op builder refuses a CUDA 13 nvcc with a torch built for another CUDA minor: op_builder/builder.py,
# assert_no_cuda_mismatch, DeepSpeed v0.19.6). Which index carries which torch:
# tests/data/torch_cuda_indexes.json (torch 2.13.0 has no cu128 build; its PyPI wheel is CUDA 13.0).
ARG CUDA_VERSION=13.0.2

FROM python:3.12-slim-bookworm AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.3.0 setuptools==80.9.0
COPY pyproject.toml README.md ./
COPY conf conf
COPY orchestrator orchestrator
COPY model model
RUN python -m build --wheel --no-isolation --outdir /dist

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04
ARG CUDA_VERSION
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
# GPU architectures DeepSpeed's fused Adam is compiled for, once, here: A100, A10/L4, H100, B200
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0 10.0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/orch PATH=/opt/orch/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3.12 is Ubuntu 24.04's; g++ and libaio for DeepSpeed's ops; wget for KubeRay's probes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ libaio-dev wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/orch
# torch from the index of this image's CUDA (13.0.2 -> cu130), pinned with that local version, so
# pip stops here, saying so, when the index has no such build; then the check that nvcc agrees.
RUN cuda_tag="cu$(echo "${CUDA_VERSION}" | cut -d. -f1,2 | tr -d .)" \
    && pip install --index-url "https://download.pytorch.org/whl/${cuda_tag}" "torch==${TORCH_VERSION}+${cuda_tag}" \
    && pip install "setuptools>=70.1" "ninja>=1.11" "packaging>=24" \
    && python -c "import torch, sys; v = torch.version.cuda; sys.exit(0 if v and v.startswith('${CUDA_VERSION%.*}') else f'torch is built for CUDA {v}, the image has ${CUDA_VERSION}')"
# DeepSpeed's GPU ops compiled now, not by every worker at start. There is no GPU while an image is
# built, so DeepSpeed's accelerator detection would pick `cpu`, compile CPU ops and record `cpu`;
# at run time that record does not match `cuda` and every worker compiles again (setup.py writes
# accelerator_name into git_version_info_installed.py; builder.py load() uses a prebuilt op only when
# it matches). DS_ACCELERATOR=cuda and the arch list make it a CUDA build; the last line checks the record.
# Before the wheel is copied in: a change of orch's code does not rebuild DeepSpeed.
RUN DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
        pip install --no-build-isolation --no-binary deepspeed "deepspeed==${DEEPSPEED_VERSION}" \
    && python -c "from deepspeed.git_version_info import accelerator_name as a, installed_ops as o; import sys; sys.exit(0 if a == 'cuda' and o['fused_adam'] and o['cpu_adam'] else f'DeepSpeed ops built for {a}: {o}')"
COPY --from=wheel /dist /tmp/dist
RUN pip install "$(ls /tmp/dist/orch-*.whl)[train]" \
    && rm -rf /tmp/dist \
    && python -c "import torch, ray, deepspeed, orchestrator.conf; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
# The image's user `orch`, uid 1000 (Ubuntu's own `ubuntu` makes way), by number so Kubernetes'
# runAsNonRoot can check it; KubeRay pods run as it (fsGroup 1000 owns their volumes).
RUN (userdel -r ubuntu 2>/dev/null || true) && useradd --create-home --uid 1000 --shell /bin/bash orch
USER 1000:1000
WORKDIR /home/orch
CMD ["orch", "--help"]
