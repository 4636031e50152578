"""What is done to the model for speed and scale, in one place, outside the model code: DDP or
FSDP2, torch.compile, activation checkpointing, fast matmuls, and the GPU peaks MFU divides by.

The processes and collectives are `grr_train/runtime/distributed.py`; sharded checkpoints are
`grr_train/runs/sharded.py`.

FSDP2 (`parallelism=fsdp`): `fully_shard` per transformer block, then the root (embeddings,
poolers, projections, heads). Each process keeps a 1/world slice of every parameter in fp32 (the
master weights the optimizer updates); a block's full weights exist only while it runs. Weights
are gathered in the run's autocast dtype (bf16 on CUDA: half the all-gather traffic) and
gradients reduced in fp32. On the CPU the run computes in fp32 (precision auto), so nothing is
cast and FSDP computes what DDP does up to summation order: that is what lets the CPU tests
compare the two. Order, as torchtitan's: activation checkpointing, then compile per block, then
shard (FSDP's hooks run outside the compiled block graphs). Setting up holds the whole fp32
model on each device once (rank 0's weights are broadcast before sharding): 8 GB at 2B.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from grr_train.runtime.distributed import DistInfo

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


def _fsdp_units(model: nn.Module):
    """The modules `fully_shard` wraps below the root, innermost first: every transformer block
    and, in a cross-attention block, its key/value projection. The multimodal decoder computes
    all its blocks' image keys and values before running them (`TextDecoder.context_keys_values`),
    outside the blocks' forward, so that projection gathers its own weights when called."""
    for block in _blocks(model):
        cross = getattr(block, "cross_attn", None)
        if cross is not None:
            yield cross.kv
        yield block


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place over the default process group; `param_dtype`: the compute dtype weights are
    gathered in (None: their own, fp32). Gradients are averaged over ranks in fp32, as DDP's are."""
    # Each rank built the model from its own seed; DDP starts every rank from rank 0's weights,
    # fully_shard would keep each rank's own slice, so rank 0's go to every rank first.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in _fsdp_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # FSDP2 warns that an in-place op on a unit's output would skip its gradient hook; the model
    # writes no output in place (tests/test_fsdp.py: FSDP's gradients equal DDP's).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def parallelize(model: nn.Module, info: DistInfo, compile: str = "off",
                activation_checkpointing: bool = False, parallelism: str = "ddp",
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Move to the device; checkpoint and compile blocks as asked; with peers, wrap in DDP or
    shard with FSDP2 (`param_dtype`: FSDP's compute dtype, the run's autocast dtype). One process
    with `fsdp` has nothing to shard and trains the plain model (its checkpoints are still sharded
    ones, so the run resumes on any number of processes)."""
    model.to(info.device)
    enable_fast_math(info.device)
    if activation_checkpointing:
        checkpoint_blocks(model)
    apply_compile(model, resolve_compile(compile, info.device))
    if info.distributed and parallelism == "fsdp":
        model = shard_model(model, param_dtype)
    elif info.distributed:
        model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model module itself (under FSDP2 the sharded model is the module: its weights are DTensors)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module):
    """A context in which backward accumulates gradients locally, without the all-reduce (DDP) or
    reduce-scatter (FSDP2); the micro-batch after it synchronises. A plain model: nothing to skip."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to `max_norm`; returns the norm before clipping, a plain
    0-d tensor (under FSDP2 torch returns a DTensor, whose shards hold the whole norm)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not in the table (then no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None
