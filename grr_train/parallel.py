"""What is done to the model for speed and scale, in one place, outside the model code: DDP,
torch.compile, activation checkpointing, fast matmuls, and the GPU peaks MFU divides by.

The processes and collectives are `grr_train/distributed.py`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from grr_train.distributed import DistInfo

# Dense bf16 peak FLOP/s per device, for MFU; matched against the device name in this order.
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


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


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not in the table (then no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None
