"""Settings from text and the command line: `--set key=value`, `--config FILE` (JSON, TOML or YAML)
and the dedicated flags, applied over a recipe's `TrainConfig` (grr_train/train/config.py) in the
order that module's docstring gives; `plan_run` checks all of it before any data is read.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from grr_data.infra.names import did_you_mean
from grr_train.train.config import (
    RESUMABLE_KEYS,
    TrainConfig,
    check_type,
    parse_value,
    recipe,
    unknown_names,
)


def parse_set(items: list[str]) -> dict:
    """`["key=value", ...]` -> {key: typed value}; the type comes from TrainConfig's field."""
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: expected --set key=value")
        if key not in known:
            raise ValueError(f"--set {item!r}: unknown setting {key!r}{did_you_mean(key, known)}; "
                             f"known: {', '.join(sorted(known))}")
        out[key] = parse_value(key, text.strip())
    return out


# A settings file's format by its suffix; anything else is read as JSON.
FILE_FORMATS = {".toml": "TOML table", ".yaml": "YAML mapping", ".yml": "YAML mapping"}


def load_config_file(path: str | Path) -> dict:
    """A `--config` file of settings, checked like `--set`: JSON, TOML (.toml) or YAML (.yaml, .yml),
    flat or under `train` (a run's config.json is a template for another run)."""
    path = Path(path)
    what = FILE_FORMATS.get(path.suffix.lower(), "JSON object")
    try:
        text = path.read_text()
        data = _parse_settings_text(text, what)
    except (OSError, ValueError) as e:  # JSONDecodeError, TOMLDecodeError and yaml's (wrapped) are ValueErrors
        hint = "" if what != "JSON object" else "; settings files are JSON, TOML (.toml) or YAML (.yaml, .yml)"
        raise ValueError(f"--config {path}: cannot read a {what} ({e}){hint}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a {what} of settings, got {type(data).__name__}")
    data = data.get("train", data)  # a run's config.json works too
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown_names(unknown)}")
    try:
        # TOML has no null and YAML reads 1e-4 as text: a string is parsed as --set parses it.
        return {k: check_type(k, parse_value(k, v) if isinstance(v, str) else v) for k, v in data.items()}
    except ValueError as e:
        raise ValueError(f"--config {path}: {e}") from None


def _parse_settings_text(text: str, what: str):
    if what == "TOML table":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError("TOML needs Python 3.11 or later, or `pip install tomli`") from None
        return tomllib.loads(text)
    if what == "YAML mapping":
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(str(e).replace("\n", " ")) from e
    return json.loads(text)


def resolve_config(recipe_name: str, config_file: str | None = None, sets: list[str] | None = None,
                   defaults: dict | None = None, **flags) -> TrainConfig:
    """Recipe defaults, then the config file, then `--set`, then flags that are not None.

    `defaults`: settings that apply only where the file, `--set` and the flags all leave them.
    """
    given = {**(load_config_file(config_file) if config_file else {}), **parse_set(sets or []),
             **{k: check_type(k, v) for k, v in flags.items() if v is not None}}
    fallback = {k: check_type(k, v) for k, v in (defaults or {}).items() if k not in given}
    cfg = replace(recipe(recipe_name), **fallback, **given)
    if cfg.recipe != recipe_name:
        raise ValueError(f"the settings say recipe={cfg.recipe!r} but the command is {recipe_name!r}")
    cfg.validate()
    return cfg


def resume_config(run_dir: str | Path, sets: list[str] | None = None, config_file: str | None = None,
                  **flags) -> TrainConfig:
    """The config a run was started with, changed only in RESUMABLE_KEYS by the config file, `--set`
    and flags (a value equal to the run's is no change, so the command line that started a run
    also resumes it)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found; is {run_dir} a run folder?")
    cfg = TrainConfig.from_dict(json.loads(path.read_text())["train"])
    changes = {**(load_config_file(config_file) if config_file else {}), **parse_set(sets or []),
               **{k: check_type(k, v) for k, v in flags.items() if v is not None}}
    changes = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
    refused = sorted(set(changes) - RESUMABLE_KEYS)
    if refused:
        raise ValueError(f"a resumed run keeps its settings; cannot change {', '.join(refused)} "
                         f"(changeable on resume: {', '.join(sorted(RESUMABLE_KEYS))})")
    cfg = replace(cfg, **changes)
    cfg.validate()
    return cfg


RESUME_MODES = ("no", "yes", "auto")


def plan_run(recipe_name: str, run_dir: str | Path, resume: str = "no", config_file: str | None = None,
             sets: list[str] | None = None, defaults: dict | None = None,
             fresh_only: dict | None = None, **flags) -> tuple[TrainConfig, bool, str | None]:
    """The settings a `grr train` command trains with, whether it resumes, and a note to print.

    `resume`: "no" starts a run, "yes" continues one, "auto" continues when `run_dir` holds a
    checkpoint and starts otherwise (one command line for a requeued job or a torchrun restart).
    `fresh_only`: flags that only a new run reads (fine-tuning's DATASET and --from); an explicit
    resume ignores them, an automatic one checks them against the run's like any other flag.
    Everything a user can get wrong is checked here, before any data is read or process started;
    the trainer keeps its own rules (no fresh start over checkpoints, no resume without one).
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"--resume {resume!r}: expected one of {', '.join(RESUME_MODES)}")
    note = None
    if resume != "yes":
        flags = {**flags, **(fresh_only or {})}
    if resume == "auto":
        from grr_train.runs.checkpoint import latest_checkpoint

        run_dir = Path(run_dir)
        resume = "yes" if run_dir.is_dir() and latest_checkpoint(run_dir) is not None else "no"
        if resume == "yes":
            note = f"auto-resume: {run_dir} holds a checkpoint; resuming"
        elif (run_dir / "config.json").is_file():
            note = (f"note: auto-resume: {run_dir} has a config.json but no checkpoint (a run that stopped "
                    "before its first save); starting fresh in it")
    if resume == "yes":
        cfg = resume_config(run_dir, sets, config_file, **flags)
    else:
        cfg = resolve_config(recipe_name, config_file, sets, defaults=defaults, **flags)
        if cfg.recipe == "finetune" and not Path(cfg.init_from).exists():
            raise FileNotFoundError(f"--from {cfg.init_from}: no such run or checkpoint folder")
    if cfg.recipe != recipe_name:
        raise ValueError(f"{run_dir} holds a {cfg.recipe} run, not a {recipe_name} one")
    if cfg.loader == "dali":
        from grr_data.loader import dali_problem

        if problem := dali_problem(need_gpu=True):
            raise ValueError(problem)
    data = check_data(cfg.data, cfg.dataset if cfg.recipe == "finetune" else None)
    if cfg.recipe == "finetune" and resume != "yes":
        check_dataset_name(cfg.dataset, data)
    return cfg, resume == "yes", note


def check_data(data: str | Path, dataset: str | None = None):
    """The set's Manifest; ValueError naming the manifest when `data` is not a readable sharded set
    (with the local set whose name is closest, when `data` is fine-tuning's data/DATASET/shards)."""
    from grr_data.format.manifest import Manifest, ManifestNotFound

    try:
        return Manifest.read(data)
    except ManifestNotFound as e:
        if dataset is None or Path(data) != Path("data", dataset, "shards"):
            raise
        local = [p.parent.name for p in Path("data").glob("*/shards") if p.is_dir()]
        raise ManifestNotFound(f"{e}{did_you_mean(dataset, local)}") from None


def check_dataset_name(dataset: str | None, data) -> None:
    """Fine-tuning's DATASET names the set: it must be the dataset the set was fetched as, where the
    set records one (grr data fetch does; a set sharded from a folder of one's own does not)."""
    recorded = (data.document.get("fetch_manifest") or {}).get("dataset")
    if dataset and recorded and dataset != recorded:
        raise ValueError(f"DATASET {dataset!r}{did_you_mean(dataset, [recorded])}, but {data.root} holds the "
                         f"{recorded!r} set (grr data fetch {recorded}): pass {recorded} as DATASET, or the "
                         f"--data of {dataset}")
