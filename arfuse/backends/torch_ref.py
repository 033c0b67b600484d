"""Reference backend: ``torch.distributed.all_reduce`` then the epilogue in torch, for every spec.

Works on every device and process-group backend (gloo on CPU, NCCL on GPU); it is the correctness oracle for the
other backends and the last resort of every fallback. World size 1 (or no process group) skips the collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from arfuse.backends.base import ALL_FEATURES, Backend, IndexGuard, Support, Workspace, register
from arfuse.core.math import epilogue, moe_finalize
from arfuse.core.spec import FusionSpec
from arfuse.core.types import Capacity, FusedCall, GroupCaps

NAME = "torch_ref"


class RefWorkspace(Workspace):
    def __init__(self, group, world_size: int, device: torch.device = torch.device("cpu")):
        super().__init__()
        self.group = group
        self.world_size = world_size
        if device.type == "cuda":
            self.index_guard = IndexGuard(device)


class TorchRefBackend(Backend):
    """``dist.all_reduce`` in the input dtype, then the epilogue in fp32 (see ``arfuse.core.math``)."""

    name = NAME
    variants = ("default",)
    support = Support(devices=frozenset({"cpu", "cuda"}),
                      dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}), features=ALL_FEATURES)
    priority = 1000
    needs_prepare_vote = False
    multi_host = True

    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> RefWorkspace:
        return RefWorkspace(group, caps.world_size, capacity.device)

    def run(self, ws: RefWorkspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        out = call.out
        dtype = call.x.dtype
        if spec.moe:
            summed = moe_finalize(call, dtype)
            if ws.index_guard is not None:
                ws.index_guard.record((call.expert_idx < 0) | (call.expert_idx >= call.x.shape[0]))
        else:
            summed = out if out.dtype == dtype else torch.empty_like(call.x)
            summed.copy_(call.x)
        if ws.world_size > 1:
            dist.all_reduce(summed, group=ws.group)
        if not spec.norm:
            return
        epilogue(spec, summed, call)


register(TorchRefBackend())
