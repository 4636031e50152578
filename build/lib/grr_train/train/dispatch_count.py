"""Counting the operators one training step dispatches: a CPU proxy for the GPU's kernel launches.

An eager GPU step that is launch-bound gets faster with every launch it saves, and the count can
be taken on any machine. A `TorchDispatchMode` sees every aten operator that reaches a backend,
forward and backward. Counted: operators that compute (a GPU launches at least one kernel for
each). Not counted: views (outputs that alias an input, and `_unsafe_view`), allocations
(`empty*`), reading a scalar back to the host.

Some operators are one fused kernel each way on a GPU but decompose on a CPU into many: attention
(`scaled_dot_product_attention`), `rms_norm` and dropout. Each call of these counts as one forward
and one backward operator, as on the GPU, whatever the CPU runs underneath (`FUSED_ON_GPU`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
               "lift_fresh", "detach", "set_", "resize_", "record_stream", "_unsafe_view"}
FUSED_ON_GPU = ("scaled_dot_product_attention", "rms_norm", "dropout")


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOT_KERNELS and not _is_view(func):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _as_fused(name: str, fn: Callable, ops: Counter) -> Callable:
    """`fn` counted as one operator forward and one backward, its insides unseen."""

    def call(*args, **kwargs):
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *tensors):
                with _disable_current_modes(), torch.enable_grad():
                    inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
                    full = list(args)
                    for i, t in zip(positions, inputs, strict=True):
                        full[i] = t
                    out = fn(*full, **kwargs)
                ctx.inputs, ctx.out = inputs, out
                ops[name] += 1
                return out.detach()

            @staticmethod
            def backward(ctx, grad):
                ops[name + "_backward"] += 1
                wanted = [t for t in ctx.inputs if t.requires_grad]
                with _disable_current_modes():
                    grads = iter(torch.autograd.grad(ctx.out, wanted, grad, allow_unused=True))
                return tuple(next(grads) if t.requires_grad else None for t in ctx.inputs)

        if not torch.is_grad_enabled() or not any(args[i].requires_grad for i in positions):
            with _disable_current_modes():
                out = fn(*args, **kwargs)
            ops[name] += 1
            return out
        return Fused.apply(*(args[i] for i in positions))

    return call


def count_dispatched(step: Callable[[], object]) -> Counter:
    """Operators per name that one call of `step` dispatches (see the module docstring)."""
    counter = _Counter()
    with ExitStack() as stack:
        for name in FUSED_ON_GPU:
            stack.enter_context(mock.patch.object(F, name, _as_fused(name, getattr(F, name), counter.ops)))
        stack.enter_context(counter)
        step()
    return counter.ops
