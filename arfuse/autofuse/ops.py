"""The op the fusion pass puts into a compiled graph: ``arfuse::autofused``, one op for every spec.

Its schema is the operand schema's (:func:`arfuse.core.operands.op_schema`): every input slot, the scalars, then
``eps_t`` (eps as a 0-d CPU tensor when the graph takes it as an input, as ``dynamic=True`` does to float
attributes), the spec's code, the process-group name the matched allreduce carried and the capacity; it is
functional (new outputs, no mutation) and returns the outputs the spec writes, shaped as ``x`` (any shape
``(..., hidden)``), with a fake implementation read off the same table. Its eager implementation runs the spec
on the fusion object of the shared cache (:mod:`arfuse.fusions`) for (group ranks, hidden size, dtype, device,
capacity), made collectively at the first run of the compiled graph, which every rank runs in the same order,
never during CUDA-graph capture. A call with more tokens than the capacity runs the reference backend's math
(``torch.distributed.all_reduce``, then the epilogue in torch), counted and logged once.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from arfuse import fusions
from arfuse.backends.torch_ref import RefWorkspace, TorchRefBackend
from arfuse.core import operands
from arfuse.core.counters import Counters, log_once, resolve_strict
from arfuse.core.errors import FallbackError
from arfuse.core.operands import Shape
from arfuse.core.spec import FusionSpec
from arfuse.core.types import FusedCall
from arfuse.probe import vote

Tensor = torch.Tensor
UNFUSED_PATH = "autofuse/unfused (over max_tokens)"
counters = Counters()  # this module's own fallbacks; part of arfuse.stats() like every fusion object's
LIB = torch.library.Library("arfuse", "FRAGMENT")
LIB.define(operands.op_schema("autofused", ("Tensor? eps_t", "int spec", "str group_name", "int max_tokens"),
                              returns=True))
_REFERENCE = TorchRefBackend()


def _resolve_group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _rows(t: Optional[Tensor], hidden: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1, hidden).contiguous()


def autofused(x, residual, weight, scale, expert_idx, expert_scales, shared, eps, weight_offset, eps_t, spec,
              group_name, max_tokens) -> List[Tensor]:
    """The outputs of one call of the spec whose code is ``spec`` over the group ``group_name`` (see the module
    docstring)."""
    spec = FusionSpec.from_code(spec)
    hidden = x.shape[-1]
    group = _resolve_group(group_name)
    call = FusedCall(_rows(x, hidden), None, residual=_rows(residual, hidden),
                     weight=None if weight is None else weight.contiguous(),
                     eps=eps if eps_t is None else float(eps_t), weight_offset=weight_offset, scale=scale,
                     expert_idx=expert_idx, expert_scales=expert_scales, shared=_rows(shared, hidden))
    fusion = fusions.fusion_for(group, hidden, x.dtype, x.device, max_tokens=max_tokens)  # at every size alike
    if call.num_tokens > max_tokens:
        _unfused(spec, call, group, max_tokens)
    else:
        fusion.run(spec, call)
    return _returned(spec, {o.slot: getattr(call, o.slot) for o in operands.outputs(spec)},
                     residual if spec.moe else x)


def _returned(spec: FusionSpec, made, like: Tensor) -> List[Tensor]:
    """The outputs in the op's order, each (tokens, hidden) one viewed as ``like`` (the graph's own shape)."""
    return [made[o.slot].view(like.shape) if o.shape is Shape.ROWS else made[o.slot] for o in operands.outputs(spec)]


def _unfused(spec: FusionSpec, call: FusedCall, group, max_tokens: int) -> None:
    """The reference backend's math on new outputs, counted as a fallback (raises in strict mode)."""
    reason = f"{spec.name}: {call.num_tokens} tokens > max_tokens {max_tokens} of arfuse.compile: ran unfused"
    if resolve_strict(None):
        raise FallbackError("arfuse.compile", reason)
    counters.count_fallback(reason)
    counters.count_call(UNFUSED_PATH)
    log_once(f"autofuse-capacity:{spec.name}:{max_tokens}",
             f"arfuse: {reason} (raise arfuse.compile(..., max_tokens=) to fuse calls this large)")
    x = call.x if call.expert_idx is None else call.expert_idx
    for name, t in operands.allocate_all(spec, x.shape[0], call.x.shape[1], call.x.dtype, call.x.device).items():
        setattr(call, name, t)
    _REFERENCE.run(RefWorkspace(group, vote.world_size(group)), "default", spec, call)


def _autofused_fake(x, residual, weight, scale, expert_idx, expert_scales, shared, eps, weight_offset, eps_t, spec,
                    group_name, max_tokens) -> List[Tensor]:
    """New outputs as the real op returns them: allocated alike (contiguous whatever ``x``'s strides), shaped as
    ``x``."""
    spec = FusionSpec.from_code(spec)
    like, hidden = residual if spec.moe else x, x.shape[-1]
    made = operands.allocate_all(spec, like.numel() // max(hidden, 1), hidden, x.dtype, x.device)
    return _returned(spec, made, like)


LIB.impl("autofused", autofused, "CompositeExplicitAutograd")
torch.library.register_fake("arfuse::autofused", _autofused_fake, lib=LIB)


def close_all() -> None:
    """Close every cached fusion object (the compiled graphs' and the functional forms'; the next call makes them
    again). Not collective."""
    fusions.close_all()
