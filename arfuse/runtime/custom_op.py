"""The ``torch.library`` op every public call goes through, so models compile with ``fullgraph=True``.

``arfuse::fused_`` writes its outputs into caller-allocated tensors (declared mutated) and returns nothing; the
fusion object is passed as an integer handle into a registry of live executors, and what the call computes as
its :class:`~arfuse.core.spec.FusionSpec` code, so every pattern crosses the boundary through this one op.
In-place residual mode passes ``residual=None`` and the residual tensor as ``residual_out`` (read, then
overwritten), so no argument aliases another.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Dict, Optional

import torch

from arfuse.core.spec import FusionSpec
from arfuse.core.validate import check_moe_indices
from arfuse.core.types import FusedCall
from arfuse.runtime.executor import Executor

_executors: "Dict[int, weakref.ref[Executor]]" = {}
_next_handle = itertools.count(1)
_lock = threading.Lock()


def register_executor(executor: Executor) -> int:
    """Give ``executor`` a handle the op can carry; it is dropped when the executor is garbage collected."""
    handle = next(_next_handle)
    with _lock:
        _executors[handle] = weakref.ref(executor, lambda _ref, h=handle: _executors.pop(h, None))
    return handle


def lookup(handle: int) -> Executor:
    ref = _executors.get(handle)
    executor = ref() if ref is not None else None
    if executor is None or executor.closed:
        raise ValueError(f"arfuse: fusion handle {handle} is closed or was never created")
    return executor


@torch.library.custom_op("arfuse::fused_", mutates_args=("out", "residual_out", "norm_out", "scale_out"))
def fused_(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
           scale: Optional[torch.Tensor], expert_idx: Optional[torch.Tensor], expert_scales: Optional[torch.Tensor],
           shared: Optional[torch.Tensor], eps: float, weight_offset: float, handle: int, spec: int,
           out: torch.Tensor, residual_out: Optional[torch.Tensor], norm_out: Optional[torch.Tensor],
           scale_out: Optional[torch.Tensor]) -> None:
    """One fused call of the spec whose code is ``spec`` (see ``arfuse.core.spec``) into the given outputs."""
    if expert_idx is not None:  # what the public op could not read while it was traced
        check_moe_indices("moe_finalize_residual_rmsnorm", expert_idx, x.shape[0])
    call = FusedCall(x, out, residual=residual if residual is not None else residual_out, weight=weight, eps=eps,
                     weight_offset=weight_offset, scale=scale, expert_idx=expert_idx, expert_scales=expert_scales,
                     shared=shared, residual_out=residual_out, norm_out=norm_out, scale_out=scale_out)
    lookup(handle).run(FusionSpec.from_code(spec), call)


@fused_.register_fake
def _fused_fake(x, residual, weight, scale, expert_idx, expert_scales, shared, eps, weight_offset, handle, spec, out,
                residual_out, norm_out, scale_out) -> None:
    return None


def run_call(executor: Executor, handle: int, spec: FusionSpec, call: FusedCall) -> None:
    """Run one validated call: through the registered op while tracing (compile, export, fake tensors), straight
    to the executor in eager mode, where the op's dispatch would cost ~100 µs of Python per call. In place,
    the op gets ``residual=None`` (the residual is ``residual_out``), so no two of its arguments alias."""
    if torch.compiler.is_compiling() or type(call.x) is not torch.Tensor:
        fused_(call.x, None if call.inplace else call.residual, call.weight, call.scale, call.expert_idx,
               call.expert_scales, call.shared, call.eps, call.weight_offset, handle, spec.code, call.out,
               call.residual_out, call.norm_out, call.scale_out)
    else:
        executor.run(spec, call)
