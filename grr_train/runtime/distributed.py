"""Processes and collectives in one place: the process group, torchrun, and the few collectives the
trainer, the losses and validation use (all of them no-ops in a single process); also a gloo group
beside the main one (`cpu_group`) for agreements that must not wait for a GPU.

Processes are started by torchrun (`python -m torch.distributed.run`), which sets RANK,
LOCAL_RANK and WORLD_SIZE; `grr train ... --nproc-per-node N` starts it for one node. GPUs talk
over NCCL, CPU processes over gloo. What is done to the model (DDP, compile, checkpointing) is
`grr_train/runtime/parallel.py`.

`all_gather_with_grad` (contrastive negatives across ranks): `torch.distributed.all_gather` cuts
the graph; this one sends each rank the gradient that all ranks' losses put on its own rows.
Backward all-reduces (sums) the gathered gradient and keeps this rank's slice, so the gradient
reaching the local embeddings is that of the SUM of the ranks' losses; DDP then averages parameter
gradients over ranks, which gives the gradient of the mean loss. An all-reduce rather than a
reduce-scatter because gloo has no reduce-scatter.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float | None = None) -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this process's device.

    `timeout_minutes`: how long a collective may wait for the other ranks before failing (the
    process-group timeout; None: torch's default, 10 minutes for NCCL). Raise it for slow saves
    or validation on one rank; lower it to fail fast when a rank dies.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


# Process groups kept until the interpreter exits rather than freed with their last user (see
# destroy_distributed): the main group and cpu_group's.
_RETIRED_GROUPS: list = []


def destroy_distributed() -> None:
    """Leave the process group. The group object itself is kept until the interpreter exits: gloo's
    worker threads free a finished collective's tensors after its caller has moved on, and freeing a
    tensor Python owned takes the GIL; were the group's C++ destructor (which joins those threads)
    to run now, from the last reference (DDP's reducer, dropped as the trainer goes, with the GIL
    held), a worker still waiting for the GIL would wait forever (seen: 2-process runs hung at exit
    under load, after the run's last all_gather_object; docs/LOG.md)."""
    if dist.is_initialized():
        _RETIRED_GROUPS.append(dist.group.WORLD)
        dist.destroy_process_group()


def distributed_world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...), rank r's rows at [r * B, (r + 1) * B).

    Every rank must pass the same B (the loaders give every rank the same batch size).
    Without an initialised process group (or with one rank) returns x itself.
    """
    _, world = distributed_world()
    if world == 1:
        return x
    return _AllGather.apply(x)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order; no autograd (metrics only)."""
    _, world = distributed_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def all_gather_objects(obj, group=None) -> list:
    """Every rank's `obj`, in rank order (one element when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def cpu_group(timeout_minutes: float | None = None):
    """A gloo group of all ranks beside the main one, for agreements the CPU answers
    (grr_train/train/store_guard.py): reading a collective's result on the host waits for the GPU
    when the group is NCCL's, never when it is gloo's. Every rank calls it together; None when not
    distributed. `timeout_minutes`: as `init_distributed`'s (None: torch's default for gloo)."""
    if not dist.is_initialized():
        return None
    kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    group = dist.new_group(backend="gloo", **kwargs)
    _RETIRED_GROUPS.append(group)  # freed at exit, as the main group is (destroy_distributed says why)
    return group


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc_per_node: int, argv: list[str]) -> int:
    """Run this same command again under torchrun with `nproc_per_node` processes on this node.

    `argv` is the command's arguments without `--nproc-per-node`; the entry module is
    `grr_cli.main`, so the cluster form is `torchrun ... -m grr_cli.main train pretrain ...`.

    A stop signal (SIGTERM from Slurm, Kubernetes or `timeout`, often sent to the whole process
    group; Ctrl-C) must end in a checkpoint and exit 0. torchrun, signalled itself, kills its
    workers and exits 1 with a traceback, so it runs in a session of its own, out of reach of a
    group signal, and this launcher hands the signal to the training processes themselves: they
    save at the next step and exit 0, and so does torchrun.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc_per_node}", "-m", "grr_cli.main", *argv]
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, _frame):
        workers = _children(proc.pid)
        for pid in workers or [proc.pid]:  # before torchrun has started them: torchrun itself
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def strip_nproc_option(argv: list[str]) -> list[str]:
    """`argv` without `--nproc-per-node N` / `--nproc-per-node=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out
