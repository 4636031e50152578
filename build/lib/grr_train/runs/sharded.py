"""Sharded checkpoints (`parallelism=fsdp`): model and optimizer through torch.distributed.checkpoint
(DCP), kept in the run-folder conventions of `grr_train/runs/checkpoint.py`.

Every process writes its own shards into the checkpoint's `sharded/` folder at once (no process
ever holds the whole model), then hashes its share of the files; the main process writes
`state.pt` (schedule, early stopper, loader positions and RNG states per rank), `meta.json` and
SHA256SUMS over every file, and renames the folder into place as a whole checkpoint is. The state
dicts are torch's `get_state_dict` ones, keyed by parameter name, so DCP reshards on load: a run
saved by N processes resumes on M, and one process reads the whole model into a plain one
(`grr eval`, `grr export`, `finetune --from`). On several nodes the run folder must be one shared
file system: every rank writes into the same checkpoint folder.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from grr_data.infra.files import sha256_file
from grr_train.runs import checkpoint as ckpt
from grr_train.runtime.distributed import all_gather_objects, barrier, distributed_world

MODEL, OPTIMIZER = "model", "optimizer"  # the two top-level keys of the DCP state dict


@contextmanager
def _quiet_single_process():
    """DCP warns on every save and load in a process without a process group (one process with
    parallelism=fsdp, grr eval, grr export) that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _reason(err: BaseException) -> str:
    """One line for an error: DCP's own holds every failed rank's traceback; its first cause says it."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def save_sharded(final: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 meta: dict, keep: int | None = None) -> Path:
    """Write the checkpoint folder `final` (a `step-*` folder or `best/`) atomically; every process
    calls it together. `state`: the trainer's state without the optimizer (DCP holds that)."""
    rank, world = distributed_world()
    # The main process's pid names the temporary folder: it is the one that publishes it.
    tmp = ckpt.temporary_folder(final, all_gather_objects(os.getpid())[0])
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with ckpt.explain_full_disk("saving the checkpoint", final), _quiet_single_process():
            try:
                dcp.save({MODEL: model_state, OPTIMIZER: optimizer_state}, checkpoint_id=tmp / ckpt.SHARDED,
                         no_dist=not dist.is_initialized())
            except CheckpointException as err:
                # A failed write on any rank raises on every rank, all ranks' errors in one; a
                # write error (a full disk among them) is raised as itself, which names the file.
                cause = next((exc for exc, _ in err.failures.values() if isinstance(exc, OSError)), None)
                if cause is None:
                    raise
                raise cause from err
        barrier()
        names = [f"{ckpt.SHARDED}/{p.name}" for p in sorted((tmp / ckpt.SHARDED).iterdir()) if p.is_file()]
        digests = {}
        for part in all_gather_objects({name: sha256_file(tmp / name) for name in names[rank::world]}):
            digests.update(part)
        if rank == 0:
            ckpt.finish_checkpoint_dir(tmp, state, {**meta, "sharded": True}, digests)
            ckpt.place_checkpoint(tmp, final, keep)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into this run's (sharded or plain) model and
    its optimizer, resharding to this run's processes; every process calls it together."""
    model_state, optimizer_state = get_state_dict(model, optimizer)  # creates the optimizer's state
    loaded = {MODEL: model_state, OPTIMIZER: optimizer_state}
    try:
        with _quiet_single_process():
            dcp.load(loaded, checkpoint_id=Path(folder) / ckpt.SHARDED, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP gathers every rank's failure into one
        raise ckpt.CheckpointError(f"{folder / ckpt.SHARDED}: cannot load the model and optimizer ({_reason(err)})") from err
    set_state_dict(model, optimizer, model_state_dict=loaded[MODEL], optim_state_dict=loaded[OPTIMIZER])


def _stored_model(folder: Path) -> dict[str, torch.Size]:
    """{parameter name: shape} of the model in a sharded checkpoint (its metadata only)."""
    path = Path(folder) / ckpt.SHARDED
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # noqa: BLE001 - unpickling a damaged file fails in many ways
        raise ckpt.CheckpointError(f"{path}/.metadata: cannot be read ({err}); the checkpoint is damaged") from err
    prefix = MODEL + "."
    return {key[len(prefix):]: entry.size for key, entry in metadata.state_dict_metadata.items()
            if key.startswith(prefix)}


def stored_weight_names(folder: Path) -> list[str]:
    return list(_stored_model(folder))


def load_whole_weights(model: torch.nn.Module, folder: Path) -> None:
    """Read a sharded checkpoint's weights, whole, into the plain `model`, strictly, in this process
    alone (no collectives, whether or not a process group is up)."""
    path = Path(folder) / ckpt.SHARDED
    stored = _stored_model(folder)
    own = model.state_dict()
    missing = [name for name in own if name not in stored]
    unexpected = [name for name in stored if name not in own]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{path} does not fit the model {model.__class__.__name__}: missing "
                                   f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                                   f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{name} {tuple(stored[name])} vs {tuple(own[name].shape)}" for name in own
             if stored[name] != own[name].shape]
    if wrong:
        raise ckpt.CheckpointError(f"{path} does not fit the model: shapes differ (stored vs model): "
                                   f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    loaded = {MODEL: own}  # DCP copies into these tensors, which share the parameters' storage
    try:
        with torch.no_grad(), _quiet_single_process():
            dcp.load(loaded, checkpoint_id=path, no_dist=True)
    except (Exception, CheckpointException) as err:
        raise ckpt.CheckpointError(f"{path}: cannot read the weights ({_reason(err)}); the checkpoint is damaged") from err
    model.load_state_dict(loaded[MODEL])
