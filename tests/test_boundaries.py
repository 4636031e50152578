"""The one-way data flow of DESIGN.md, checked on the source: grr_data never imports grr_train,
grr_train imports only grr_data's contract (the token layout, the loader, the set's manifest
reader) and its atomic-write helper, and the model imports neither data nor training code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What grr_train may use of grr_data: the token layout, the loader, the manifest's one reader,
# and atomic file writes (infrastructure kept once).
DATA_CONTRACT = ("grr_data.layout", "grr_data.loader", "grr_data.dataset", "grr_data.files")


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, allowed) -> list[str]:
    return [f"{path}: {name}" for path, names in imported_modules(package).items()
            for name in sorted(names) if not allowed(path, name)]


def test_grr_data_never_imports_the_trainer_or_model():
    assert offenders("grr_data", lambda path, name: not name.startswith("grr_train")) == []


def test_grr_train_uses_only_the_data_contract():
    def allowed(path, name):
        if not name.startswith("grr_data"):
            return True
        return name in DATA_CONTRACT and "model/" not in path

    assert offenders("grr_train", allowed) == []


def test_the_model_imports_no_training_code():
    def allowed(path, name):
        if "model/" not in path or not name.startswith("grr_train"):
            return True
        return name.startswith("grr_train.model")

    assert offenders("grr_train", allowed) == []
