"""The Python code inside an export: `grr_train.infer.hf_model` and every grr module it imports, copied
with their grr imports made relative, so transformers' `trust_remote_code` loads the model where
grr is not installed.

    grr_train.infer.hf_model  -> modeling_grr_coca.py       (what config.json's auto_map names)
    grr_train.model.coca      -> grr_model_coca.py          (and so on: grr_ + the path under grr_train)
    grr_data.format.layout    -> grr_data_format_layout.py

The modules are found by following imports from `grr_train.infer.hf_model`, so a new file in the model
code travels without a change here. Only `from grr_x.y import ...` at module level can be rewritten;
any other grr import in that code is refused when the export is written, not when someone loads it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ENTRY = "grr_train.infer.hf_model"
MODELING_FILE = "modeling_grr_coca"
AUTO_MAP = {"AutoConfig": f"{MODELING_FILE}.GrrCocaConfig", "AutoModel": f"{MODELING_FILE}.GrrCocaModel"}


def file_stem(module: str) -> str:
    """The name of `module`'s copy in an export, without `.py`."""
    if module == ENTRY:
        return MODELING_FILE
    top, _, rest = module.partition(".")
    return "grr_" + rest.replace(".", "_") if top == "grr_train" else module.replace(".", "_")


def _grr_imports(module: str, tree: ast.Module) -> list[ast.ImportFrom]:
    """The module-level `from grr_... import` statements of `module`; ValueError for any other grr import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("grr_train", "grr_data") for a in node.names):
            raise ValueError(f"{module} line {node.lineno}: `import grr_...` cannot be bundled into an export; "
                             "write `from grr_x.y import name`")
        if isinstance(node, ast.ImportFrom) and (node.level or 0) > 0:
            raise ValueError(f"{module} line {node.lineno}: a relative import cannot be bundled into an export")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("grr_train", "grr_data"):
            if node not in tree.body:
                raise ValueError(f"{module} line {node.lineno}: a grr import inside a function or block cannot be "
                                 "bundled into an export; import it at the top of the module")
            found.append(node)
    return found


def _source_of(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"{module}: no Python source to bundle into an export")
    if spec.submodule_search_locations is not None:
        raise ValueError(f"{module} is a package: import from its modules (e.g. {module}.coca) in bundled code")
    return Path(spec.origin)


def bundled_sources(entry: str = ENTRY) -> dict[str, str]:
    """{file name in the export: its source} for `entry` and every grr module it imports, rewritten."""
    out, todo, seen = {}, [entry], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        text = _source_of(module).read_text()
        lines = text.splitlines(keepends=True)
        for node in _grr_imports(module, ast.parse(text)):
            todo.append(node.module)
            i = node.lineno - 1
            lines[i], count = re.subn(rf"^from\s+{re.escape(node.module)}\s+import\b",
                                      f"from .{file_stem(node.module)} import", lines[i])
            if count != 1:
                raise ValueError(f"{module} line {node.lineno}: cannot rewrite this import for an export")
        name = f"{file_stem(module)}.py"
        if name in out:
            raise ValueError(f"two modules would be bundled as {name}")
        out[name] = "".join(lines)
    return out


def write_code(folder: str | Path) -> list[str]:
    """Write the bundled modules into `folder`; returns their file names."""
    sources = bundled_sources()
    for name, text in sources.items():
        (Path(folder) / name).write_text(text)
    return sorted(sources)
