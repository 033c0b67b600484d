"""What ``arfuse bench --host`` times: its configuration, one rank's inputs and the cases (one public call each,
with its spec and its target against the anchor op)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

import arfuse
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout


@dataclass(frozen=True)
class HostConfig:
    hidden: int = 256
    tokens: int = 8
    dtype: str = "bfloat16"
    calls: int = 200  # back-to-back calls per timed sample
    samples: int = 10  # rounds; the median is the figure
    warmup: int = 20
    top_k: int = 2
    group_size: int = 128
    backends: Tuple[str, ...] = ()  # () = every registered backend that runs here
    cases: Tuple[str, ...] = ()  # () = all
    profile: bool = False
    stubbed: bool = True


class Inputs:
    """One rank's tensors for every case (reused by every call: host cost does not depend on the values)."""

    def __init__(self, cfg: HostConfig, device: torch.device, rank: int = 0):
        g = torch.Generator().manual_seed(1234 + rank)
        dtype = getattr(torch, cfg.dtype)
        n, h = cfg.tokens, cfg.hidden

        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        self.x, self.residual = rand(n, h), rand(n, h)
        self.weight = (1.0 + 0.1 * torch.randn(h, generator=g)).to(device=device, dtype=dtype)
        self.rows = n * cfg.top_k
        self.expert_out = rand(self.rows, h)
        self.idx = torch.randperm(self.rows, generator=g).reshape(n, cfg.top_k).to(device=device, dtype=torch.int32)
        self.escales = torch.rand(n, cfg.top_k, generator=g).to(device=device, dtype=torch.float32)
        self.scale = 0.05
        self.scale_t = torch.full((1,), self.scale, dtype=torch.float32, device=device)
        self.eps = 1e-6
        self.dtype, self.device = dtype, device


@dataclass(frozen=True)
class Case:
    """One public call to time: ``name`` (the op and its form), the spec it runs, and how to make it."""

    name: str
    spec: FusionSpec
    form: str = "object"  # object / module / functional / op
    quant: object = None  # the quant= argument of residual_rmsnorm_quant
    inplace: bool = False
    caller_outputs: bool = False
    anchor_target: float = 2.0  # at most this many times one aten op of the same size (issue 23)


def _group(cfg: HostConfig, packed: bool):
    return arfuse.FP8PerTokenGroup(cfg.group_size, packed_ue8m0=packed)


def cases(cfg: HostConfig) -> List[Case]:
    """Every public op, spec kind and form timed (see the module docstring)."""
    g = cfg.group_size
    group = dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=g)
    found = [
        Case("residual_rmsnorm", FusionSpec(), anchor_target=1.5),
        Case("residual_rmsnorm out=", FusionSpec(), caller_outputs=True),
        Case("residual_rmsnorm inplace", FusionSpec(), inplace=True),
        Case("rmsnorm", FusionSpec(residual=False)),
        Case("all_reduce", FusionSpec(residual=False, norm=False)),
        Case("residual_rmsnorm_fp8", FusionSpec(quant=Quant.FP8_STATIC)),
        Case("residual_rmsnorm_quant per-token", FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
             quant=arfuse.FP8PerToken()),
        Case(f"residual_rmsnorm_quant group{g}", FusionSpec(scale_layout=ScaleLayout.FP32, **group),
             quant=_group(cfg, False)),
        Case(f"residual_rmsnorm_quant group{g} ue8m0", FusionSpec(scale_layout=ScaleLayout.UE8M0, **group),
             quant=_group(cfg, True)),
        Case("moe_finalize_residual_rmsnorm", FusionSpec(prologue=Prologue.MOE_FINALIZE)),
        Case("FusedAddRMSNorm.forward", FusionSpec(), form="module"),
        Case("functional.residual_rmsnorm", FusionSpec(), form="functional"),
        Case("functional.rmsnorm", FusionSpec(residual=False), form="functional"),
        Case("functional.all_reduce", FusionSpec(residual=False, norm=False), form="functional"),
        Case("torch.ops.arfuse.fused_ (traced path)", FusionSpec(), form="op"),
    ]
    if cfg.hidden % g:
        found = [c for c in found if not c.spec.group_size]
    if cfg.cases:
        found = [c for c in found if any(sel in c.name for sel in cfg.cases)]
    return found
