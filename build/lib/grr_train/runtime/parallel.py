"""What is done to the model for speed and scale, in one place, outside the model code: DDP or
FSDP2, torch.compile, activation checkpointing, fast matmuls, aligned widths, and the GPU peaks
MFU divides by.

Speed switches (`auto|on|off` settings, `resolve_switch`): `auto` turns a lever on where it is
meant to pay (CUDA) and off elsewhere, so the CPU's fixed-seed curve keeps its rounding. Aligned
widths (`align_widths`) pad the GEGLU hidden width and the fused caption loss's vocabulary to a
multiple of `ALIGN_MULTIPLE` inside the forward: parameters, counts and checkpoints are unchanged.
Compile mode `regions` compiles the blocks and the forward's steps between them (`REGIONS` of
grr_train/model/coca.py); `inductor_random` picks how compiled graphs draw dropout's numbers.

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

from grr_train.model.coca import REGIONS
from grr_train.model.ffn import GEGLU
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


SWITCHES = ("auto", "on", "off")
# The speed switches `auto` turns on for CUDA: only those a GPU session measured to help (docs/LOG.md,
# "issue 19"). Every lever is proven on the CPU to change nothing but speed, but none is measured on a
# GPU yet, so `auto` leaves them off until one is; `on` forces a switch.
MEASURED_ON_CUDA: frozenset[str] = frozenset()
# GEMM-friendly widths: 2073 -> 2080, 2764 -> 2784, 3801 -> 3808; vocabulary 32,102 -> 32,128.
ALIGN_MULTIPLE = 32
# How compiled graphs draw dropout's random numbers: inductor's own Philox per element ("default"),
# aten's dropout kernel ("fallback": torch._inductor.config.fallback_random, the eager masks), or
# inductor's kernels drawing the eager kernel's numbers ("align_eager", align_random_eager, CUDA).
INDUCTOR_RANDOM = ("default", "fallback", "align_eager")
# Compiled caption lengths when trimming: a multiple of this many positions (4 shapes of 64).
TRIM_BUCKET = 16


def resolve_switch(name: str, value: str, device: torch.device) -> bool:
    """An `auto|on|off` speed setting as a bool: auto is on for CUDA when `name` is measured to
    help there (MEASURED_ON_CUDA), off otherwise."""
    if value not in SWITCHES:
        raise ValueError(f"{name} must be one of {', '.join(SWITCHES)}, got {value!r}")
    if value == "auto":
        return device.type == "cuda" and name in MEASURED_ON_CUDA
    return value == "on"


def align_widths(model: nn.Module, multiple: int = ALIGN_MULTIPLE) -> list[tuple[int, int]]:
    """Run every GEGLU at its hidden width rounded up to `multiple`, and the fused caption loss at
    the vocabulary rounded up likewise (attributes the forward reads, not parameters). Returns the
    (real, padded) widths changed."""
    changed = []
    for module in model.modules():
        if isinstance(module, GEGLU):
            module.padded_hidden = -(-module.hidden // multiple) * multiple
            changed.append((module.hidden, module.padded_hidden))
    if hasattr(model, "padded_vocab"):
        vocab = model.lm_head.out_features
        model.padded_vocab = -(-vocab // multiple) * multiple
        changed.append((vocab, model.padded_vocab))
    return [c for c in changed if c[0] != c[1]]


def set_inductor_random(kind: str) -> None:
    """How every later torch.compile draws random numbers (INDUCTOR_RANDOM; the process's config)."""
    if kind not in INDUCTOR_RANDOM:
        raise ValueError(f"inductor_random must be one of {', '.join(INDUCTOR_RANDOM)}, got {kind!r}")
    import torch._inductor.config as inductor_config  # torch.compile's own module

    if kind == "align_eager" and not hasattr(inductor_config, "align_random_eager"):
        raise ValueError(f"inductor_random=align_eager needs torch._inductor.config.align_random_eager, which "
                         f"torch {torch.__version__} lacks; use default or fallback")
    inductor_config.fallback_random = kind == "fallback"
    if hasattr(inductor_config, "align_random_eager"):
        inductor_config.align_random_eager = kind == "align_eager"


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


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every transformer block, in place (`Module.compile` keeps parameter names,
    so checkpoints do not change). Returns how many."""
    count = 0
    for block in _blocks(model):
        block.compile(backend=backend)
        count += 1
    return count


def compile_regions(model: nn.Module, backend: str = "inductor", merge_context_kv: bool = True) -> int:
    """torch.compile the forward's steps outside the blocks (model/coca.py's REGIONS), in place, each
    as one graph: a compiled function stored on the instance over the method (parameter names and
    checkpoints unchanged). `merge_context_kv`: the cross-attention key/value projections of all
    blocks as one GEMM (not under FSDP2). Returns how many regions."""
    count = 0
    for path in REGIONS:
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if not hasattr(owner, name):
            continue
        setattr(owner, name, torch.compile(getattr(owner, name), backend=backend))
        count += 1
    if merge_context_kv and hasattr(model, "multimodal"):
        model.multimodal.merge_context_kv = True
    return count


def resolve_compile(mode: str, device: torch.device) -> str:
    """'auto' -> per-block compile on CUDA (measured: docs/LOG.md; 'regions', the blocks and the
    regions between them, is not measured on a GPU yet), eager elsewhere; other modes as given."""
    if mode == "auto":
        return "blocks" if device.type == "cuda" else "off"
    return mode


def apply_compile(model: nn.Module, mode: str, backend: str = "inductor", merge_context_kv: bool = True) -> None:
    """Compile per block ('blocks'), per block and per region between blocks ('regions'), or the
    whole model ('model'), in place; 'off' does nothing. `backend`: torch.compile's (tests use
    "eager" to check tracing alone).

    A graph that fails to compile runs eagerly instead (dynamo's `suppress_errors`), with a warning
    naming the failure, never a crash. Trimmed text compiles at TRIM_BUCKET's lengths (4 shapes),
    which with training and validation needs more than dynamo's 8 graphs per code object.
    """
    if mode == "off":
        return
    torch._dynamo.config.suppress_errors = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    if mode in ("blocks", "regions"):
        compile_blocks(model, backend)
        if mode == "regions":
            compile_regions(model, backend, merge_context_kv)
    elif mode == "model":
        model.compile(backend=backend)
    else:
        raise ValueError(f"unknown compile mode {mode!r}; expected 'off', 'blocks', 'regions' or 'model'")


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
                param_dtype: torch.dtype | None = None, aligned_widths: bool = False,
                inductor_random: str = "default") -> nn.Module:
    """Move to the device; align widths, checkpoint and compile blocks as asked; with peers, wrap in
    DDP or shard with FSDP2 (`param_dtype`: FSDP's compute dtype, the run's autocast dtype). One
    process with `fsdp` has nothing to shard and trains the plain model (its checkpoints are still
    sharded ones, so the run resumes on any number of processes)."""
    model.to(info.device)
    enable_fast_math(info.device)
    if aligned_widths:
        align_widths(model)
    if activation_checkpointing:
        checkpoint_blocks(model)
    set_inductor_random(inductor_random)
    apply_compile(model, resolve_compile(compile, info.device), merge_context_kv=parallelism != "fsdp")
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


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The gradients' global 2-norm, without clipping (what `clip_grad_norm` returns), a plain 0-d tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


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
