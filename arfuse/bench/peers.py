"""The unfused peers arfuse is measured against. Each is a callable with the fused call's signature::

    peer(x, residual, weight, eps, *, norm_out, residual_out) -> (norm_out, residual_out)

- ``nccl+compiled_norm``: ``dist.all_reduce(x)`` in place, as engines run it (so ``x`` is overwritten), then a
  ``torch.compile``'d add + RMSNorm. On CPU it is ``gloo+norm`` with the norm in eager torch.
- ``symm_mem_one_shot+norm`` / ``symm_mem_two_shot+norm``: ``x`` copied into a torch symmetric-memory buffer,
  ``torch.ops.symm_mem.one_shot_all_reduce`` / ``two_shot_all_reduce_`` (peer pointers; multicast is never
  used), then the compiled norm.

FlashInfer's fused kernels are measured through arfuse's own ``flashinfer`` backend. Building a peer is
collective (every rank builds it); calling one is collective and graph-capturable on CUDA.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from arfuse.core.types import Capacity, GroupCaps
from arfuse.select.policy import group_restriction

NCCL = "nccl+compiled_norm"
GLOO = "gloo+norm"
ONE_SHOT = "symm_mem_one_shot+norm"
TWO_SHOT = "symm_mem_two_shot+norm"
BASELINE = (NCCL, GLOO)  # what speed-ups are reported against
_SYMM_DTYPES = (torch.bfloat16, torch.float32)  # what torch's symm_mem reduction kernels dispatch


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                norm_out: torch.Tensor, residual_out: torch.Tensor) -> None:
    """arfuse's epilogue in torch: ``s = x + residual`` in fp32, ``residual_out = s``, ``norm_out = rmsnorm(s)``."""
    s = x.float() + residual.float()
    residual_out.copy_(s)
    norm_out.copy_(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.float())


def _raise_recompile_limit(limit: int = 64) -> None:
    # every benchmarked hidden size gets its own kernel; past dynamo's default limit it would silently run eager
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


_compiled: Optional[Callable] = None


def compiled_add_rmsnorm() -> Callable:
    """:func:`add_rmsnorm` under ``torch.compile``: token count dynamic, hidden size static (one kernel per
    hidden size, as a model would have)."""
    global _compiled
    if _compiled is None:
        _raise_recompile_limit()
        inner = torch.compile(add_rmsnorm)

        def norm(x, residual, weight, eps, norm_out, residual_out):
            for t in (x, residual, norm_out, residual_out):
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.mark_static(t, 1)
            torch._dynamo.mark_static(weight, 0)
            return inner(x, residual, weight, eps, norm_out, residual_out)

        _compiled = norm
    return _compiled


class DistAllReduceNorm:
    """``dist.all_reduce`` in place, then add + RMSNorm (compiled on CUDA, eager on CPU)."""

    def __init__(self, group, capacity: Capacity):
        self.group = group
        self.name = NCCL if capacity.device.type == "cuda" else GLOO
        self.norm = compiled_add_rmsnorm() if capacity.device.type == "cuda" else add_rmsnorm

    def __call__(self, x, residual, weight, eps=1e-6, *, norm_out, residual_out):
        dist.all_reduce(x, group=self.group)
        self.norm(x, residual, weight, eps, norm_out, residual_out)
        return norm_out, residual_out

    def close(self) -> None:
        pass


class SymmMemAllReduceNorm:
    """torch's symmetric-memory one-shot or two-shot allreduce on a staging buffer, then the compiled norm."""

    def __init__(self, group, capacity: Capacity, one_shot: bool):
        import torch.distributed._symmetric_memory as symm_mem

        if os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") != "1":
            # a rendezvous with multicast enabled may create NVLink multicast objects, which must never happen
            raise RuntimeError("symm_mem peer: export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 before running it")
        self.name = ONE_SHOT if one_shot else TWO_SHOT
        self.one_shot = one_shot
        pg = group if group is not None else dist.group.WORLD
        self.group_name = pg.group_name
        self.buffer = symm_mem.empty(capacity.max_tokens * capacity.hidden_size, dtype=capacity.dtype,
                                     device=capacity.device)
        self.handle = symm_mem.rendezvous(self.buffer, pg)  # collective
        self.norm = compiled_add_rmsnorm()

    def __call__(self, x, residual, weight, eps=1e-6, *, norm_out, residual_out):
        staged = self.buffer[:x.numel()]
        staged.copy_(x.reshape(-1))
        if self.one_shot:
            summed = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
        else:
            summed = torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        self.norm(summed.view(x.shape), residual, weight, eps, norm_out, residual_out)
        return norm_out, residual_out

    def close(self) -> None:
        self.handle = None
        self.buffer = None


def peer_reasons(caps: GroupCaps, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """Every peer for this group and dtype, with why it cannot run (None: it can). Pure."""
    if caps.device_type != "cuda":
        return {GLOO: None}
    symm_why = group_restriction(caps)
    if symm_why is None and not caps.fact("symm_mem"):
        symm_why = caps.note("symm_mem")
    if symm_why is None and dtype not in _SYMM_DTYPES:
        symm_why = f"torch's symm_mem reductions take bfloat16/float32, not {str(dtype).replace('torch.', '')}"
    return {NCCL: None, ONE_SHOT: symm_why, TWO_SHOT: symm_why}


def build_peer(name: str, group, capacity: Capacity) -> Callable:
    """The peer ``name`` for ``capacity``. Collective."""
    builders: Dict[str, Tuple[type, tuple]] = {
        NCCL: (DistAllReduceNorm, ()), GLOO: (DistAllReduceNorm, ()),
        ONE_SHOT: (SymmMemAllReduceNorm, (True,)), TWO_SHOT: (SymmMemAllReduceNorm, (False,)),
    }
    if name not in builders:
        raise ValueError(f"build_peer: unknown peer {name!r} (known: {', '.join(builders)})")
    cls, extra = builders[name]
    return cls(group, capacity, *extra)
