"""``nccl``: NCCL all_reduce, then one fused Triton epilogue kernel, for every spec.

The best unfused path, and the only GPU path for groups that span hosts (or lack P2P): what multi-node users
already trust, with the epilogue in one kernel instead of several. The MoE finalize prologue runs as one kernel
before the all_reduce, writing this rank's dtype-rounded rows into the buffer NCCL reduces; an index outside
``[0, P)`` adds nothing and is recorded in the workspace's :class:`~arfuse.backends.base.IndexGuard`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from arfuse.backends.base import ALL_FEATURES, Backend, IndexGuard, Support, Workspace, register
from arfuse.core.spec import FusionSpec
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Problem

NAME = "nccl"


class NcclWorkspace(Workspace):
    def __init__(self, group, world_size: int, scratch: torch.Tensor, index_guard: Optional[IndexGuard] = None):
        super().__init__()
        self.group, self.world_size, self.scratch = group, world_size, scratch
        self.index_guard = index_guard

    def _release(self) -> None:
        self.scratch = None


class NcclNormBackend(Backend):
    name = NAME
    variants = ("default",)
    support = Support(devices=frozenset({"cuda"}),
                      dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}), max_hidden=65536,
                      features=ALL_FEATURES)
    priority = 500
    multi_host = True

    def verified_sources(self, variant: str):
        # Checked on one GPU (world size 1): with more ranks only NCCL's all_reduce of the same buffer runs
        # between the two kernels.
        return ("arfuse.kernels.nccl_epilogue", "arfuse.backends.nccl")

    def check_group(self, caps: GroupCaps) -> Optional[str]:
        if caps.world_size > 1 and "nccl" not in (caps.dist_backend or ""):
            return f"the process group has no NCCL backend ({caps.dist_backend})"
        if not caps.triton:
            return f"Triton not installed ({caps.note('triton')})"
        return None

    def check_variant(self, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
        from arfuse.kernels.launch_config import kernel_group_size_reason

        return kernel_group_size_reason(problem.spec)

    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> NcclWorkspace:
        scratch = torch.empty(capacity.max_tokens, capacity.hidden_size, dtype=capacity.dtype,
                              device=capacity.device)
        return NcclWorkspace(group, caps.world_size, scratch, IndexGuard(capacity.device))

    def run(self, ws: NcclWorkspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        kernels = _kernels or _import_kernels()
        x, out, n = call.x, call.out, call.num_tokens
        if spec.moe:
            summed = out if out.dtype == x.dtype else ws.scratch[:n]
            kernels.moe_finalize(call, spec, ws.index_guard.ptr, summed)
        elif ws.world_size == 1 and spec.norm:
            summed = x  # nothing to reduce: the epilogue reads the input where it is
        else:
            summed = out if out.dtype == x.dtype else ws.scratch[:n]
            summed.copy_(x)
        if ws.world_size > 1:
            dist.all_reduce(summed, group=ws.group)
        if spec.norm:
            kernels.rmsnorm_epilogue(summed, call, spec)


_kernels = None  # arfuse.kernels.nccl_epilogue once imported (it needs Triton; an import per call costs ~1 µs)


def _import_kernels():
    global _kernels
    from arfuse.kernels import nccl_epilogue

    _kernels = nccl_epilogue
    return _kernels


register(NcclNormBackend())
