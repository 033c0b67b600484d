"""``nccl``: NCCL all_reduce, then one fused Triton add + RMSNorm (+FP8) kernel.

The best unfused path, and the only GPU path for groups that span hosts (or lack P2P): what multi-node users
already trust, with the epilogue in one kernel instead of three.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from arfuse.backends.base import Backend, Support, Workspace, register
from arfuse.core.spec import FusionSpec
from arfuse.core.types import Capacity, FusedCall, GroupCaps

NAME = "nccl"


class NcclWorkspace(Workspace):
    def __init__(self, group, world_size: int, scratch: torch.Tensor):
        super().__init__()
        self.group, self.world_size, self.scratch = group, world_size, scratch

    def _release(self) -> None:
        self.scratch = None


class NcclNormBackend(Backend):
    name = NAME
    variants = ("default",)
    support = Support(devices=frozenset({"cuda"}),
                      dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}), max_hidden=65536)
    priority = 500
    multi_host = True

    def check_group(self, caps: GroupCaps) -> Optional[str]:
        if caps.world_size > 1 and "nccl" not in (caps.dist_backend or ""):
            return f"the process group has no NCCL backend ({caps.dist_backend})"
        if not caps.triton:
            return f"Triton not installed ({caps.note('triton')})"
        return None

    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> NcclWorkspace:
        scratch = torch.empty(capacity.max_tokens, capacity.hidden_size, dtype=capacity.dtype,
                              device=capacity.device)
        return NcclWorkspace(group, caps.world_size, scratch)

    def run(self, ws: NcclWorkspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        x, out = call.x, call.out
        summed = out if out.dtype == x.dtype else ws.scratch[:call.num_tokens]
        summed.copy_(x)
        if ws.world_size > 1:
            dist.all_reduce(summed, group=ws.group)
        if not spec.norm:
            return
        from arfuse.kernels.add_rmsnorm import add_rmsnorm
        from arfuse.kernels.launch_config import pattern_code

        add_rmsnorm(summed, call.residual, call.weight, call.eps, call.scale, out, call.residual_out,
                    pattern_code(spec))


register(NcclNormBackend())
