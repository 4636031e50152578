"""All parallelism and speed wiring in one place, outside the model: process group, DDP, compile,
activation checkpointing.

Processes are started by torchrun (`python -m torch.distributed.run`), which sets RANK,
LOCAL_RANK and WORLD_SIZE; `grr train ... --nproc-per-node N` starts it for one node.
GPUs talk over NCCL, CPU processes over gloo.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

# Dense bf16 peak FLOP/s per device, for MFU; matched against the device name in this order.
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


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


def init_distributed() -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def enable_fast_math(device: torch.device) -> None:
    """TF32 matmuls on GPU (bf16 autocast covers most of the work; TF32 the fp32 rest)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _blocks(model: nn.Module):
    """Every element of every ModuleList: the transformer blocks."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            yield from module


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block, in place (`Module.compile` keeps parameter names,
    so checkpoints do not change). Returns how many."""
    count = 0
    for block in _blocks(model):
        block.compile()
        count += 1
    return count


def resolve_compile(mode: str, device: torch.device) -> str:
    """'auto' -> per-block compile on CUDA, eager elsewhere; other modes as given."""
    if mode == "auto":
        return "blocks" if device.type == "cuda" else "off"
    return mode


def apply_compile(model: nn.Module, mode: str) -> None:
    """Compile per block ('blocks') or the whole model ('model'), in place; 'off' does nothing.

    A graph that fails to compile runs eagerly instead (dynamo's `suppress_errors`), with a warning
    naming the failure, never a crash.
    """
    if mode == "off":
        return
    torch._dynamo.config.suppress_errors = True
    if mode == "blocks":
        compile_blocks(model)
    elif mode == "model":
        model.compile()
    else:
        raise ValueError(f"unknown compile mode {mode!r}; expected 'off', 'blocks' or 'model'")


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and decoding keep nothing for backward anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing per transformer block, in place (parameter names do not change).

    Backward recomputes each block's forward; the RNG state is replayed, so dropout draws the same
    masks and the results equal a run without it.
    """
    count = 0
    for block in _blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)
        count += 1
    return count


def parallelize(model: nn.Module, info: DistInfo, compile: str = "off",
                activation_checkpointing: bool = False) -> nn.Module:
    """Move to the device; checkpoint and compile blocks as asked; wrap in DDP when there are peers."""
    model.to(info.device)
    enable_fast_math(info.device)
    if activation_checkpointing:
        checkpoint_blocks(model)
    apply_compile(model, resolve_compile(compile, info.device))
    if info.distributed:
        model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (one element when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not in the table (then no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc_per_node: int, argv: list[str]) -> int:
    """Run this same command again under torchrun with `nproc_per_node` processes on this node.

    `argv` is the command's arguments without `--nproc-per-node`; the entry module is
    `cli.main`, so the cluster form is `torchrun ... -m cli.main train pretrain ...`.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc_per_node}", "-m", "cli.main", *argv]
    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):  # torchrun passes it on to the workers, which save and exit
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
