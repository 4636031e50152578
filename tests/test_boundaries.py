"""The import direction of docs/DESIGN.md ("The code by role"), checked on the source.

grr_data never imports grr_train; grr_train's packages import only packages below them
(demo -> eval -> train -> infer -> runs -> runtime -> model, api.py on top) and only grr_data's
formats, tokenizer, loader and infrastructure (the demo also fetch and shard); only
grr_data/format/manifest.py reads a set's manifest.json; no import circle anywhere, counting the
imports made inside functions; no private name imported from another module; the CLI's modules
hang off its groups.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("grr_data", "grr_train", "grr_cli")

# What each grr_train package may import of grr_train (besides itself).
TRAIN_LAYERS = {
    "model": set(),
    "runtime": {"model"},  # parallelize and compile know the model's blocks and regions
    "runs": {"model", "runtime"},
    "train": {"model", "runtime", "runs", "infer"},  # example captions at validation
    "infer": {"model", "runtime", "runs"},
    "eval": {"model", "runtime", "runs", "train", "infer"},
    "demo": {"model", "runtime", "runs", "train", "infer", "eval"},
    "api": {"model", "runtime", "runs", "infer"},
}
# What each grr_train package may import of grr_data.
DATA_FOR_TRAIN = {
    "model": (),
    "runtime": (),
    "runs": ("grr_data.format", "grr_data.infra", "grr_data.tokenizer"),
    "train": ("grr_data.format", "grr_data.infra", "grr_data.loader"),
    "infer": ("grr_data.format", "grr_data.infra", "grr_data.loader", "grr_data.tokenizer"),
    "eval": ("grr_data.format", "grr_data.infra", "grr_data.loader"),
    "demo": ("grr_data.format", "grr_data.infra", "grr_data.fetch", "grr_data.shard.run"),
    "api": ("grr_data.format", "grr_data.infra", "grr_data.loader"),
}


def sources(*packages: str, root: Path = ROOT):
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            yield str(path.relative_to(root)), ast.parse(path.read_text(), filename=str(path))


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def known_modules(root: Path = ROOT) -> set[str]:
    return {module_name(path) for path, _ in sources(*PACKAGES, root=root)}


def imports_of(tree: ast.Module, known: set[str]) -> list[tuple[str, bool, int]]:
    """(module imported, whether inside a function, line) for each import of a known module;
    `from package import name` counts as an import of the module package.name when there is one."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names
                             if alias.name.split(".")[0] in PACKAGES)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.split(".")[0] in PACKAGES:
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in known else child.module, in_function, child.lineno))
            visit(child, inside)

    visit(tree, False)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = known_modules(root)
    graph: dict[str, set[str]] = {}
    for path, tree in sources(*PACKAGES, root=root):
        graph[module_name(path)] = {name for name, _, _ in imports_of(tree, known) if name in known}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of modules larger than one (Tarjan), as sorted lists."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def train_package(module: str) -> str | None:
    """`grr_train.train.step` -> "train"; `grr_train.api` -> "api"; None outside grr_train."""
    parts = module.split(".")
    return parts[1] if parts[0] == "grr_train" and len(parts) > 1 else None


def test_grr_data_never_imports_grr_train():
    wrong = [f"{path}: {name}" for path, tree in sources("grr_data")
             for name, _, _ in imports_of(tree, set()) if name.startswith("grr_train")]
    assert wrong == []


def test_grr_train_packages_import_only_those_below_them():
    known = known_modules()
    wrong = []
    for path, tree in sources("grr_train"):
        mine = train_package(module_name(path))
        for name, _, line in imports_of(tree, known):
            theirs = train_package(name)
            if name.startswith("grr_train") and mine and theirs and theirs != mine \
                    and theirs not in TRAIN_LAYERS[mine]:
                wrong.append(f"{path}:{line}: {name}")
    assert wrong == []


def test_grr_train_uses_only_what_it_may_of_grr_data():
    known = known_modules()
    wrong = []
    for path, tree in sources("grr_train"):
        allowed = DATA_FOR_TRAIN[train_package(module_name(path)) or "api"]
        wrong += [f"{path}:{line}: {name}" for name, _, line in imports_of(tree, known)
                  if name.startswith("grr_data") and not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert wrong == []


def test_no_import_circle_even_through_imports_inside_functions():
    assert cycles(import_graph()) == []


def test_the_circle_check_sees_a_circle_dodged_inside_a_function(tmp_path):
    (tmp_path / "grr_data").mkdir()
    (tmp_path / "grr_data" / "a.py").write_text("from grr_data.b import f\n")
    (tmp_path / "grr_data" / "b.py").write_text("def f():\n    from grr_data import a\n    return a\n")
    (tmp_path / "grr_data" / "c.py").write_text("import grr_data.a\n")
    assert cycles(import_graph(tmp_path)) == [["grr_data.a", "grr_data.b"]]


def test_no_private_name_is_imported_from_another_module():
    wrong = [f"{path}:{node.lineno}: from {node.module} import {alias.name}"
             for path, tree in sources(*PACKAGES) for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES
             for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert wrong == []


def manifest_readers(*packages: str, root: Path = ROOT) -> list[str]:
    """Where code names a set's manifest file: the literal "manifest.json" as a path part
    (`root / "manifest.json"`, `open("data/manifest.json")`). Error messages that mention the file
    inside an f-string are not reads; "fetch_manifest.json" is the fetch's own file."""
    found = []
    for path, tree in sources(*packages, root=root):
        in_messages = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                       for part in ast.walk(node)}
        found += [f"{path}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_messages
                  and node.value.rsplit("/", 1)[-1] == "manifest.json"]
    return found


def test_only_the_manifest_module_names_the_manifest_file():
    found = manifest_readers(*PACKAGES)
    assert [place for place in found if not place.startswith("grr_data/format/manifest.py:")] == []
    assert found, "the manifest module itself names the file"


def test_the_manifest_check_sees_a_manifest_read(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        'import json\nfrom pathlib import Path\n'
        'def read(d):\n    return json.loads((Path(d) / "manifest.json").read_text())\n'
        'def message(d):\n    return f"{d}/manifest.json is broken; fetch_manifest.json too"\n'
        'def other(d):\n    return open("data/manifest.json")\n'
    )
    assert sorted(manifest_readers("pkg", root=tmp_path)) == ["pkg/m.py:4", "pkg/m.py:8"]


@pytest.mark.parametrize("package", ["grr_data", "grr_train", "grr_cli"])
def test_every_package_says_what_it_owns(package):
    missing = [path for path, tree in sources(package) if path.endswith("__init__.py") and not ast.get_docstring(tree)]
    assert missing == []


def test_cli_modules_hang_off_the_groups():
    """Commands register one way: each grr_cli module adds its commands to an app of
    grr_cli.groups with its decorators; only grr_cli.main imports the command modules (and
    `python -m grr_cli`, grr_cli.__main__, imports grr_cli.main), and only grr_cli.groups makes apps."""
    known = known_modules()
    imports = {path: {name for name, _, _ in imports_of(tree, known)} for path, tree in sources("grr_cli")}
    wrong = [f"{path}: {name}" for path, names in imports.items() for name in sorted(names)
             if name.startswith("grr_cli.") and name != "grr_cli.groups" and path != "grr_cli/main.py"
             and (path, name) != ("grr_cli/__main__.py", "grr_cli.main")]
    assert wrong == []
    commands = {f"grr_cli.{Path(p).stem}" for p in imports if Path(p).stem not in ("__init__", "__main__", "main", "groups")}
    assert commands <= imports["grr_cli/main.py"], "grr_cli/main.py must import every command module"
    makers = [path for path, tree in sources("grr_cli") for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "Typer" and path != "grr_cli/groups.py"]
    assert makers == []
