"""The one-way data flow of DESIGN.md, checked on the source: grr_data never imports grr_train,
grr_train imports only grr_data's contract (the token layout, the loader, the set's manifest
reader) and its infrastructure (atomic writes, folder locks), the model imports neither data
nor training code, only grr_data reads a set's manifest.json, and the CLI's modules hang off
its groups, not off each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What grr_train may use of grr_data: the token layout, the loader, the manifest's one reader,
# and infrastructure kept once: atomic file writes, folder locks, console progress.
DATA_CONTRACT = ("grr_data.format.layout", "grr_data.loader", "grr_data.format.manifest", "grr_data.infra.files",
                 "grr_data.infra.lock", "grr_data.infra.progress")
# The grr_train modules that need more of grr_data, and what: turning caption ids into text
# needs the tokenizer (and a run keeps its own copy of it); the demo runs every stage, fetch and
# shard included.
DATA_EXTRAS = {
    "grr_train/infer/captioning.py": ("grr_data.tokenizer",),
    "grr_train/runs/tokenizer.py": ("grr_data.tokenizer",),
    "grr_train/demo/run.py": ("grr_data.fetch", "grr_data.shard.run"),
}


def sources(*packages: str, root: Path = ROOT):
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            yield str(path.relative_to(root)), ast.parse(path.read_text(), filename=str(path))


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path, tree in sources(package):
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                # `from cli import evaluate` imports the module grr_cli.evaluate
                names |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "grr_cli"}
        found[path] = names
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
        return name in DATA_CONTRACT + DATA_EXTRAS.get(path, ()) and "model/" not in path

    assert offenders("grr_train", allowed) == []


def test_the_model_imports_no_training_code():
    def allowed(path, name):
        if "model/" not in path or not name.startswith("grr_train"):
            return True
        return name.startswith("grr_train.model")

    assert offenders("grr_train", allowed) == []


def manifest_readers(*packages: str, root: Path = ROOT) -> list[str]:
    """Where code builds the path of a set's manifest: the literal "manifest.json" as a path
    part (`root / "manifest.json"`, `open("data/manifest.json")`). Error messages that mention
    the file inside an f-string are not reads; "fetch_manifest.json" is the fetch's own file."""
    found = []
    for path, tree in sources(*packages, root=root):
        in_messages = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                       for part in ast.walk(node)}
        found += [f"{path}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_messages
                  and node.value.rsplit("/", 1)[-1] == "manifest.json"]
    return found


def test_only_grr_data_reads_the_manifest():
    """grr_data.format.manifest.Manifest is the one reader: the schema of manifest.json is grr_data's."""
    assert manifest_readers("grr_cli", "grr_train") == []


def test_the_check_sees_a_manifest_read(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        'import json\nfrom pathlib import Path\n'
        'def read(d):\n    return json.loads((Path(d) / "manifest.json").read_text())\n'
        'def message(d):\n    return f"{d}/manifest.json is broken; fetch_manifest.json too"\n'
        'def other(d):\n    return open("data/manifest.json")\n'
    )
    assert sorted(manifest_readers("pkg", root=tmp_path)) == ["pkg/m.py:4", "pkg/m.py:8"]


def test_cli_modules_hang_off_the_groups():
    """Commands register one way: each cli module adds its commands to an app of grr_cli.groups with
    its decorators; only grr_cli.main imports the command modules, and only grr_cli.groups makes apps."""
    imports = imported_modules("grr_cli")
    wrong = [f"{path}: {name}" for path, names in imports.items() for name in sorted(names)
             if name.startswith("grr_cli.") and name != "grr_cli.groups" and path != "grr_cli/main.py"]
    assert wrong == []
    commands = {f"grr_cli.{Path(p).stem}" for p in imports if Path(p).stem not in ("__init__", "main", "groups")}
    assert commands <= imports["grr_cli/main.py"], "grr_cli/main.py must import every command module"
    makers = [path for path, tree in sources("grr_cli") for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "Typer" and path != "grr_cli/groups.py"]
    assert makers == []
