"""One-off functional forms. Each call runs on the fusion object of the shared cache (:mod:`arfuse.fusions`) for
(group, shape, dtype, device, backend), regrown to the next power of two when a call brings more tokens.
Collective: every rank must make the same calls in the same order (making a cached object is collective too).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from arfuse import fusions
from arfuse.api import AllReduceFusion
from arfuse.core import validate
from arfuse.core.types import FusedOutput


def _fusion_for(op: str, group, x, backend: str, name: str = "x") -> AllReduceFusion:
    if type(x) is torch.Tensor and type(backend) is str and x.dim() == 2:
        found = fusions.cached_for(group, x.shape[1], x.dtype, x.device, x.shape[0], backend)
        if found is not None:  # an object exists for x's hidden size, dtype and device: they were checked then
            return found
    validate.check_functional_input(op, x, name)
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    return fusions.fusion_for(group, x.shape[1], x.dtype, x.device, x.shape[0], backend=backend)


def residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                     group=None, backend: str = "auto", weight_offset: float = 0.0,
                     inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``AllReduceFusion.residual_rmsnorm`` without managing the object. Collective."""
    return _fusion_for("residual_rmsnorm", group, x, backend).residual_rmsnorm(
        x, residual, weight, eps, weight_offset=weight_offset, inplace=inplace)


def residual_rmsnorm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                           quant, group=None, backend: str = "auto", weight_offset: float = 0.0,
                           also_norm: bool = False, inplace: bool = False) -> FusedOutput:
    """``AllReduceFusion.residual_rmsnorm_quant`` without managing the object. Collective."""
    return _fusion_for("residual_rmsnorm_quant", group, x, backend).residual_rmsnorm_quant(
        x, residual, weight, eps, quant=quant, weight_offset=weight_offset, also_norm=also_norm, inplace=inplace)


def moe_finalize_residual_rmsnorm(expert_out: torch.Tensor, permuted_idx: torch.Tensor,
                                  expert_scales: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                  eps: float = 1e-6, *, shared_expert_out: Optional[torch.Tensor] = None,
                                  group=None, backend: str = "auto", weight_offset: float = 0.0, quant=None,
                                  also_norm: bool = False, inplace: bool = False) -> FusedOutput:
    """``AllReduceFusion.moe_finalize_residual_rmsnorm`` without managing the object (sized by ``residual``, the
    (tokens, hidden) tensor every call has). Collective."""
    fusion = _fusion_for("moe_finalize_residual_rmsnorm", group, residual, backend, "residual")
    return fusion.moe_finalize_residual_rmsnorm(expert_out, permuted_idx, expert_scales, residual, weight, eps,
                                                shared_expert_out=shared_expert_out, weight_offset=weight_offset,
                                                quant=quant, also_norm=also_norm, inplace=inplace)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, group=None, backend: str = "auto",
            weight_offset: float = 0.0) -> torch.Tensor:
    """``AllReduceFusion.rmsnorm`` without managing the object. Collective."""
    return _fusion_for("rmsnorm", group, x, backend).rmsnorm(x, weight, eps, weight_offset=weight_offset)


def all_reduce(x: torch.Tensor, *, group=None, backend: str = "auto") -> torch.Tensor:
    """``AllReduceFusion.all_reduce`` without managing the object. Collective."""
    return _fusion_for("all_reduce", group, x, backend).all_reduce(x)


def close_all(group: Optional[object] = None) -> None:
    """Close the cached fusion objects (of one group, or all)."""
    fusions.close_all(group)
