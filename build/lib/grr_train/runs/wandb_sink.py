"""A run's Weights & Biases side (optional: `pip install 'grr-coca[wandb]'`, `--set wandb_project=NAME`).

`MetricsLog` sends the records it logs to TensorBoard here too, under the same names
(`train/loss`, `val/perplexity`). The W&B run's id is kept in the run folder (`RUN/wandb_id`),
so `--resume` and `--auto-resume` continue the same W&B run; a fresh start gets a new one. W&B's
files go to `RUN/wandb/`. `wandb_mode=offline` (or W&B's own WANDB_MODE=offline) writes there
without network; `wandb sync RUN/wandb/offline-run-*` uploads later, each resumed session as a
part of the one run. Steps a crashed run logged past its last checkpoint are not logged again
after the resume: W&B keeps a step's first values, and an exact resume recomputes the same ones.
"""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

ID_FILE = "wandb_id"
MODES = ("online", "offline", "disabled")
INSTALL = "pip install 'grr-coca[wandb]'"


def check_available(project: str | None, mode: str | None) -> None:
    """ValueError before a run starts when W&B is asked for but cannot work."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"wandb_mode must be one of {', '.join(MODES)} (or none: W&B's own default), got {mode!r}")
    if project and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"wandb_project={project} needs the wandb package, which is not installed: {INSTALL}")


class WandbSink:
    """One W&B run per grr run folder, continued across resumes."""

    def __init__(self, run_dir: Path, project: str, entity: str | None, mode: str | None, resume: bool,
                 config: dict):
        import wandb

        self._wandb = wandb
        id_path = Path(run_dir) / ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(6)  # W&B ids: letters, digits, - and _
            id_path.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=project, entity=entity, mode=mode, id=run_id, resume="allow",
                                  dir=str(run_dir), name=Path(run_dir).resolve().name, config=config)
        except Exception as err:  # wandb raises its own errors (no login, no network)
            raise ValueError(f"W&B could not start ({type(err).__name__}: {err}); run `wandb login`, or set "
                             "--set wandb_mode=offline (upload later with `wandb sync RUN/wandb/offline-run-*`)"
                             ) from err
        self.id = run_id

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()
