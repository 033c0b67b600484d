"""The fused op's math in torch, shared by the reference backend and the NCCL path's eager fallback.

Spec: ``s = allreduce(x) + residual`` in fp32; ``residual_out = s`` rounded to the input dtype;
``norm = s * rsqrt(mean(s^2) + eps) * weight`` in fp32, rounded to the input dtype (or to fp8 as
``clamp(norm / scale, -448, 448)`` for the FP8 epilogue). The norm is taken of the fp32 sum, not of the rounded
residual, as the fused kernels do.
"""
from __future__ import annotations

from typing import Optional

import torch

from arfuse.core.types import FP8_MAX


def rmsnorm_fp32(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``s * rsqrt(mean(s^2, -1) + eps) * weight`` with ``s`` already fp32."""
    return s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def quantize_fp8(norm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 (e4m3) quantization: ``clamp(norm / scale, -448, 448)``."""
    return (norm / scale.float()).clamp(-FP8_MAX, FP8_MAX)


def epilogue(summed: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
             scale: Optional[torch.Tensor], out: torch.Tensor, residual_out: Optional[torch.Tensor]) -> None:
    """Write the fused outputs given the already-allreduced ``summed`` (any float dtype)."""
    s = summed.float()
    if residual is not None:
        s = s + residual.float()
        residual_out.copy_(s)
    norm = rmsnorm_fp32(s, weight, eps)
    out.copy_(quantize_fp8(norm, scale) if scale is not None else norm)
