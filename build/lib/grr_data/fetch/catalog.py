"""Dataset manifests (`manifests/NAME.json`): sources, licence, citation, expected counts, split rules.

Everything dataset-specific that is data rather than code lives in these files; the fetchers read
them through `load_manifest`. The folder is found, in order, from the `GRR_MANIFESTS` environment
variable, beside the repository root of a source checkout, or under `sys.prefix/share/grr/manifests`
for an installed package.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ENV_VAR = "GRR_MANIFESTS"
REQUIRED_KEYS = ("name", "title", "sources", "licence", "citation", "expected", "split_rule")


def manifests_dir() -> Path:
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(Path(__file__).resolve().parents[2] / "manifests")  # the checkout
    candidates.append(Path(sys.prefix) / "share" / "grr" / "manifests")
    for path in candidates:
        if path.is_dir() and any(path.glob("*.json")):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no dataset manifests found (tried {tried}); set {ENV_VAR} to the repository's manifests/ folder"
    )


def list_manifests() -> list[str]:
    return sorted(p.stem for p in manifests_dir().glob("*.json"))


def load_manifest(name: str) -> dict:
    """The manifest of dataset `name` as a dict; raises a clear error if it is missing or malformed."""
    path = manifests_dir() / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for dataset {name!r} at {path}; known: {', '.join(list_manifests())}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if manifest["name"] != name:
        raise ValueError(f"{path}: its name is {manifest['name']!r}, expected {name!r}")
    return manifest
