#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything `orch` needs.
#
#   bash scripts/setup.sh          # orch with its training stack (the `train` extra)
#   bash scripts/setup.sh --test   # plus the test tools (pytest, moto)
#
# (A laptop that only drives a cluster through its Jobs API needs neither: `pip install orch-*.whl`.)
#
# torch: a torch that is already importable by the chosen Python (a GPU user's CUDA build, say)
# is kept: the venv sees it through --system-site-packages when ORCH_USE_SYSTEM_TORCH=1, and a
# torch already in .venv is never replaced. Otherwise, on a machine without an NVIDIA GPU, the
# CPU build is installed (a few hundred MB instead of several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${ORCH_VENV:-.venv}"
TORCH_VERSION="${ORCH_TORCH_VERSION:-2.13.0}"   # the images' pin too (tests/unit/cluster/test_dockerfiles.py)
EXTRAS="[train]"
[[ "${1:-}" == "--test" ]] && EXTRAS="[train,test]"

if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ "${ORCH_USE_SYSTEM_TORCH:-0}" == "1" ]]; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
pip_install() {
    # (the filter drops a harmless pip warning about empty mirror folders on some machines)
    "$PY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    pip_install "torch>=2.4"
else
    echo "setup: no GPU, installing the CPU build of torch ${TORCH_VERSION}"
    # A local wheel or cache may already hold the CPU build; else take it from PyTorch's CPU index.
    pip_install "torch==${TORCH_VERSION}+cpu" \
        || pip_install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

echo "setup: installing orch${EXTRAS} (editable) and its dependencies"
pip_install -e ".${EXTRAS}"
# DeepSpeed compiles a CPU op at first use (about a minute): pay it here, not in the first run.
DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}" \
    "$PY" -m orchestrator.train.extensions 2>"$VENV/torch_extensions.log" \
    || echo "setup: warning: could not prebuild DeepSpeed's ops (see $VENV/torch_extensions.log); the first run builds them"
"$PY" -c "import importlib.metadata as m, torch, ray, orchestrator; print('setup: ok (torch', torch.__version__ + ', ray', ray.__version__ + ', deepspeed', m.version('deepspeed') + ')')"
