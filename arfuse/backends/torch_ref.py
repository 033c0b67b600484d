"""Reference backend: ``torch.distributed.all_reduce`` then add + RMSNorm in torch.

Works on every device and process-group backend (gloo on CPU, NCCL on GPU); it is the correctness oracle for the
other backends and the last resort of every fallback. World size 1 (or no process group) skips the collective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from arfuse.backends.base import Backend, Support, Workspace, register
from arfuse.core.math import epilogue
from arfuse.core.types import Capacity, GroupCaps, Pattern

NAME = "torch_ref"


class RefWorkspace(Workspace):
    def __init__(self, group, world_size: int):
        super().__init__()
        self.group = group
        self.world_size = world_size


class TorchRefBackend(Backend):
    """``dist.all_reduce`` in the input dtype, then the epilogue in fp32 (see ``arfuse.core.math``)."""

    name = NAME
    variants = ("default",)
    support = Support(devices=frozenset({"cpu", "cuda"}),
                      dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}))
    priority = 1000
    needs_prepare_vote = False
    multi_host = True

    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> RefWorkspace:
        return RefWorkspace(group, caps.world_size)

    def run(self, ws: RefWorkspace, variant: str, pattern: Pattern, x: torch.Tensor,
            residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], eps: float,
            scale: Optional[torch.Tensor], out: torch.Tensor, residual_out: Optional[torch.Tensor]) -> None:
        summed = out if out.dtype == x.dtype else torch.empty_like(x)
        summed.copy_(x)
        if ws.world_size > 1:
            dist.all_reduce(summed, group=ws.group)
        if pattern is Pattern.ALLREDUCE:
            return
        epilogue(summed, residual, weight, eps, scale, out, residual_out)


register(TorchRefBackend())
