"""Which DALI extra `scripts/install.sh` installs: prints `gpu-cu12`, `gpu-cu13` or nothing.

DALI is only worth its ~1 GB where an NVIDIA GPU is present (`nvidia-smi -L` lists one), and its
wheel must match the CUDA major version torch was built with: the CUDA 13 torch on the package index
cannot load nvidia-dali-cuda120's CUDA 12 libraries (libnppc.so.12). The reason for the choice goes
to stderr. Runs before grr is installed, so it imports nothing of grr.

    python scripts/choose_dali.py [--want auto|cu12|cu13|none] [--torch-cuda VER|none] [--nvidia-smi PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

EXTRAS = {"12": "gpu-cu12", "13": "gpu-cu13"}  # CUDA major -> extra in pyproject.toml
WANTS = ("auto", "cu12", "cu13", "none")
DALI_PLATFORMS = {("Linux", "x86_64"), ("Linux", "aarch64")}  # where NVIDIA publishes DALI wheels


def list_gpus(nvidia_smi: str | None) -> list[str]:
    """The GPUs `nvidia-smi -L` lists (lines starting "GPU "); none when it is missing or fails."""
    if nvidia_smi is None:
        return []
    try:
        result = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("GPU ")]


def choose(want: str, torch_cuda: str | None, gpus: list[str], system: str, machine: str) -> tuple[str | None, str]:
    """(extra or None, why). `torch_cuda` is `torch.version.cuda` (None for a CPU build)."""
    if want not in WANTS:
        raise ValueError(f"GRR_DALI={want!r}: use one of {', '.join(WANTS)}")
    if want == "none":
        return None, "DALI not installed (GRR_DALI=none)"
    if want != "auto":
        return EXTRAS[want[2:]], f"{EXTRAS[want[2:]]} as asked (GRR_DALI={want})"
    if (system, machine) not in DALI_PLATFORMS:
        return None, f"DALI not installed: NVIDIA publishes no DALI wheel for {system} {machine}"
    if not gpus:
        return None, ("DALI not installed: no NVIDIA GPU (nvidia-smi -L lists none); the CPU loader is used. "
                      "GRR_DALI=cu12 or cu13 installs it anyway (its CPU path is tested)")
    if torch_cuda is None:
        return None, (f"DALI not installed: {len(gpus)} GPU(s) found but torch is a CPU build; install a CUDA "
                      "build of torch first (pip install torch), then rerun")
    major = torch_cuda.split(".")[0]
    if major not in EXTRAS:
        return None, (f"DALI not installed: torch is built for CUDA {torch_cuda} and grr offers DALI for "
                      f"CUDA {' and '.join(EXTRAS)} only; GRR_DALI=cu12 or cu13 forces one")
    return EXTRAS[major], f"{EXTRAS[major]}: {len(gpus)} GPU(s) and torch built for CUDA {torch_cuda}"


def torch_cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--want", default=os.environ.get("GRR_DALI", "auto"),
                        help="auto (default, or $GRR_DALI), cu12, cu13 or none")
    parser.add_argument("--torch-cuda", help="torch.version.cuda to assume ('none' for a CPU build); "
                        "default: ask the installed torch")
    parser.add_argument("--nvidia-smi", help="nvidia-smi to run (default: the one on PATH)")
    args = parser.parse_args(argv)
    if args.torch_cuda is None:
        cuda = torch_cuda_version()
    else:
        cuda = None if args.torch_cuda.lower() == "none" else args.torch_cuda
    gpus = list_gpus(args.nvidia_smi or shutil.which("nvidia-smi"))
    try:
        extra, why = choose(args.want, cuda, gpus, platform.system(), platform.machine())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(why, file=sys.stderr)
    print(extra or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
