"""The ``torch.library`` op every public call goes through while traced, so models compile with
``fullgraph=True``.

``arfuse::fused_`` takes every slot of a call (its schema is the operand schema's, :func:`arfuse.core.operands.
op_schema`), writes its outputs into caller-allocated tensors (declared mutated) and returns nothing; the fusion
object is passed as an integer handle into a registry of live executors, and what the call computes as its
:class:`~arfuse.core.spec.FusionSpec` code, so every spec crosses the boundary through this one op. In-place
residual mode passes ``residual=None`` and the residual tensor as ``residual_out`` (read, then overwritten), so no
argument aliases another. The op is defined with :class:`torch.library.Library` (not ``custom_op``), whose eager
dispatch costs a few microseconds instead of hundreds.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Dict

import torch

from arfuse.core import operands
from arfuse.core.spec import FusionSpec
from arfuse.core.types import FusedCall
from arfuse.core.validate import check_moe_indices
from arfuse.runtime.executor import Executor

_executors: "Dict[int, weakref.ref[Executor]]" = {}
_next_handle = itertools.count(1)
_lock = threading.Lock()
LIB = torch.library.Library("arfuse", "FRAGMENT")  # the namespace's ops (the compile pass adds its own)


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


LIB.define(operands.op_schema("fused_", ("int handle", "int spec")))


def fused_(x, residual, weight, scale, expert_idx, expert_scales, shared, eps, weight_offset, handle, spec, out,
           residual_out, norm_out, scale_out) -> None:
    """One fused call of the spec whose code is ``spec`` (see ``arfuse.core.spec``) into the given outputs."""
    if expert_idx is not None:  # what the public op could not read while it was traced
        check_moe_indices("moe_finalize_residual_rmsnorm", expert_idx, x.shape[0])
    call = FusedCall(x, out, residual=residual if residual is not None else residual_out, weight=weight, eps=eps,
                     weight_offset=weight_offset, scale=scale, expert_idx=expert_idx, expert_scales=expert_scales,
                     shared=shared, residual_out=residual_out, norm_out=norm_out, scale_out=scale_out)
    lookup(handle).run(FusionSpec.from_code(spec), call)


def _fused_fake(x, residual, weight, scale, expert_idx, expert_scales, shared, eps, weight_offset, handle, spec, out,
                residual_out, norm_out, scale_out) -> None:
    return None


LIB.impl("fused_", fused_, "CompositeExplicitAutograd")
torch.library.register_fake("arfuse::fused_", _fused_fake, lib=LIB)
FUSED_OP = torch.ops.arfuse.fused_.default


def op_arguments(call: FusedCall, handle: int, spec: FusionSpec) -> tuple:
    """The op's arguments for ``call``, in its schema's order (in place: ``residual=None``)."""
    inputs = tuple(None if slot == "residual" and call.inplace else getattr(call, slot)
                   for slot in operands.INPUT_SLOTS)
    return inputs + (call.eps, call.weight_offset, handle, spec.code) + tuple(
        getattr(call, slot) for slot in operands.OUTPUT_SLOTS)


def run_call(executor: Executor, handle: int, spec: FusionSpec, call: FusedCall) -> None:
    """Run one prepared call: through the registered op while tracing (compile, export, fake tensors) or for
    tensor subclasses, straight to the executor otherwise."""
    if torch.compiler.is_compiling() or type(call.x) is not torch.Tensor:
        FUSED_OP(*op_arguments(call, handle, spec))
    else:
        executor.run(spec, call)
