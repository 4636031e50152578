#!/usr/bin/env bash
# Creates .venv and installs grr into it. Torch first: on a machine without a GPU a CPU build
# (a local wheel where the platform provides one), with a GPU the default CUDA build.
# GRR_EXTRAS overrides the extras (default: dev, plus gpu where the DALI wheel exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${GRR_TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install --quiet --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "installing torch==$TORCH_VERSION"
    pip install --quiet "torch==$TORCH_VERSION"
fi

extras=${GRR_EXTRAS:-dev}
case "$(uname -sm)" in
    "Linux x86_64"|"Linux aarch64") extras="${GRR_EXTRAS:-dev,gpu}" ;;
esac
echo "installing grr[$extras]"
if ! pip install --quiet -e ".[$extras]"; then
    echo "grr[$extras] failed to install; retrying without DALI (the CPU loader still works)" >&2
    pip install --quiet -e ".[dev]"
fi
.venv/bin/python -c "import torch, grr_train, grr_data; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
