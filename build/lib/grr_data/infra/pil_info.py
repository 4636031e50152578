"""Which PIL build decodes our JPEGs: Pillow or pillow-simd.

Both distributions install the same `PIL` folder, so pip's list of installed packages cannot say
which one is in use: whichever was installed last owns the files. The build in use is the one whose
version equals `PIL.__version__` (pillow-simd's carry a `.postN` suffix no Pillow release has).
"""

from __future__ import annotations

from importlib import metadata

DISTRIBUTIONS = ("pillow-simd", "Pillow")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pil_build() -> dict:
    """{"build": "pillow-simd" | "Pillow" | "unknown", "version", "libjpeg", "installed", "warning"}."""
    import PIL
    from PIL import features

    installed = {name: v for name in DISTRIBUTIONS if (v := _installed(name)) is not None}
    build = next((name for name, v in installed.items() if v == PIL.__version__), "unknown")
    if features.check_feature("libjpeg_turbo"):
        libjpeg = f"libjpeg-turbo {features.version('libjpeg_turbo')}"
    else:
        libjpeg = f"libjpeg {features.version('jpg')}" if features.check("jpg") else None
    warning = None
    if len(installed) > 1:
        warning = (f"both {' and '.join(f'{n} {v}' for n, v in installed.items())} are installed and share the "
                   f"PIL folder; {build} is in use. Any later `pip install` may swap them: rerun "
                   "`GRR_SIMD=1 bash scripts/install.sh` to end with pillow-simd")
    return {"build": build, "version": PIL.__version__, "libjpeg": libjpeg, "installed": installed,
            "warning": warning}


def describe_pil_build() -> str:
    """One line, e.g. `PIL: Pillow 13.0.0 (libjpeg-turbo 3.1.0)`."""
    info = pil_build()
    line = f"PIL: {info['build']} {info['version']} ({info['libjpeg'] or 'no JPEG support'})"
    return line if info["warning"] is None else f"{line}; warning: {info['warning']}"


if __name__ == "__main__":
    print(describe_pil_build())
