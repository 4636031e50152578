#!/usr/bin/env bash
# Creates .venv and installs grr (distribution grr-coca, command grr) into it; safe to rerun.
# Torch first: an installed torch is kept; otherwise torch==$GRR_TORCH_VERSION from the index.
# Then grr with the extras dev, tensorboard and s3 ($GRR_EXTRAS replaces that list), plus DALI only where
# an NVIDIA GPU is present, matching torch's CUDA version (scripts/choose_dali.py; GRR_DALI=auto|cu12|cu13|none).
# GRR_SIMD=1 ends with pillow-simd in place of Pillow (built from source: needs a C compiler and
# the libjpeg and zlib headers).
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

# The distribution was called `grr` before (a name the package index gives to another project):
# remove that editable install of this checkout so that two distributions do not both own `grr`.
if pip show grr 2>/dev/null | grep -x "Editable project location: $PWD" >/dev/null; then
    echo "removing the old editable install named grr (now grr-coca)"
    pip uninstall --quiet -y grr
fi

dali=$(.venv/bin/python scripts/choose_dali.py)
extras=${GRR_EXTRAS:-dev,tensorboard,s3}${dali:+,$dali}
echo "installing grr-coca[$extras]"
if ! pip install --quiet -e ".[$extras]"; then
    [ -n "$dali" ] || exit 1
    echo "grr-coca[$extras] failed to install; retrying without DALI (the CPU loader still works)" >&2
    pip install --quiet -e ".[${GRR_EXTRAS:-dev,tensorboard,s3}]"
fi

# clip_benchmark's own zero-shot and retrieval functions evaluate a grr model in the tests
# (tests/test_openclip_api.py). Without its dependencies: they would pull torchvision and open_clip,
# and pip would replace the installed torch; the functions the tests call need scikit-learn only.
case ",${GRR_EXTRAS:-dev,tensorboard,s3}," in
    *,dev,*) pip install --quiet --no-deps "clip_benchmark==1.6.2" && pip install --quiet "scikit-learn>=1.3" ;;
esac

if [ "${GRR_SIMD:-0}" = 1 ]; then
    # Pillow and pillow-simd share the PIL folder and Pillow is a dependency of matplotlib and
    # scikit-image, so pip reinstalls it on every run: end by replacing it with pillow-simd again.
    if [ "$(.venv/bin/python -c 'from grr_data.infra.pil_info import pil_build; print(pil_build()["build"])')" != pillow-simd ]; then
        echo "replacing Pillow with pillow-simd (built from source once, then from pip's cache)"
        pip uninstall --quiet -y pillow pillow-simd
        case "$(uname -m)" in x86_64) export CC=${CC:-"cc -mavx2"} ;; esac
        pip install --quiet pillow-simd
    fi
fi

.venv/bin/python - <<'EOF'
import importlib.util, shutil, sys, torch
from importlib import metadata
from grr_data.infra.pil_info import describe_pil_build
sys.path.insert(0, "scripts")
from choose_dali import list_gpus
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| GPU available:", torch.cuda.is_available())
print(describe_pil_build())
dali = []
for name in ("nvidia-dali-cuda120", "nvidia-dali-cuda130"):
    try:
        dali.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
if dali and not list_gpus(shutil.which("nvidia-smi")):
    print(f"DALI: {', '.join(dali)} installed earlier, but no NVIDIA GPU here; "
          f"`.venv/bin/pip uninstall {' '.join(d.split()[0] for d in dali)}` frees about 1 GB (the DALI tests then skip)")
else:
    print("DALI:", ", ".join(dali) or "not installed (the CPU loader is used)")
print("tensorboard:", "installed" if importlib.util.find_spec("tensorboard") else "not installed (runs write no TensorBoard logs)")
EOF
