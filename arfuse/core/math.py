"""Every fused call's math in torch, read off its :class:`~arfuse.core.spec.FusionSpec`: the reference backend
runs it after its allreduce, and the float64 oracle (:mod:`arfuse.verify`) shares the scale rules.

Spec (see :mod:`arfuse.core.spec`): the prologue's input is rounded to the input dtype before the allreduce;
``s = allreduce(x) + residual`` in fp32; ``residual_out = s`` rounded to the input dtype; the norm is taken of the
fp32 sum (not of the rounded residual), as the fused kernels do; quantizations read the fp32 norm.

>>> import torch
>>> scales = torch.tensor([[1.0, 0.25, 2.0 ** -20, 4.0, 0.5]])
>>> packed = pack_ue8m0(scales)
>>> packed.shape, packed.stride()
(torch.Size([1, 2]), (1, 4))
>>> torch.equal(unpack_ue8m0(packed, 5), scales)
True
"""
from __future__ import annotations

from typing import Optional

import torch

from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
from arfuse.core.types import FP8_MAX, FusedCall

PER_TOKEN_MIN_SCALE = 1.0 / (512.0 * FP8_MAX)  # e4m3's smallest subnormal over its largest finite value
GROUP_MIN_SCALE = 1e-10


def rmsnorm_fp32(s: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """``s * rsqrt(mean(s^2, -1) + eps) * (weight + weight_offset)`` with ``s`` already fp32."""
    w = weight.float()
    if weight_offset:
        w = w + weight_offset
    return s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def quantize_fp8(norm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 (e4m3) quantization with a static or broadcastable scale: ``clamp(norm / scale, -448, 448)``."""
    return (norm / scale.float()).clamp(-FP8_MAX, FP8_MAX)


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Each positive normal float32 rounded up to the next power of two (itself if it is one): a UE8M0 scale."""
    bits = scale.float().contiguous().view(torch.int32)
    up = torch.where((bits & 0x7FFFFF) != 0, (bits + 0x800000) & 0x7F800000, bits)
    return up.view(torch.float32)


def dynamic_scales(spec: FusionSpec, norm: torch.Tensor) -> torch.Tensor:
    """The dynamic scales of ``norm`` (tokens, hidden) as float32 (tokens, groups), UE8M0 ones rounded up."""
    if spec.quant is Quant.FP8_PER_TOKEN:
        return (norm.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(PER_TOKEN_MIN_SCALE)
    tokens, hidden = norm.shape
    amax = norm.reshape(tokens, hidden // spec.group_size, spec.group_size).abs().amax(dim=-1).float()
    scales = (amax / FP8_MAX).clamp_min(GROUP_MIN_SCALE)
    return round_up_pow2(scales) if spec.scale_layout is ScaleLayout.UE8M0 else scales


def expand_scales(scales: torch.Tensor, hidden: int) -> torch.Tensor:
    """Per-group scales (tokens, groups) broadcast to one per element (tokens, hidden)."""
    return scales.repeat_interleave(hidden // scales.shape[1], dim=1) if scales.shape[1] > 1 else scales


def ue8m0_empty(tokens: int, groups: int, device) -> torch.Tensor:
    """An int32 (tokens, ceil(groups / 4)) tensor in the packed UE8M0 layout: column-major, token stride padded to
    a multiple of 4."""
    packs, padded = -(-groups // 4), -(-tokens // 4) * 4
    return torch.empty(packs, padded, dtype=torch.int32, device=device).t()[:tokens]


def pack_ue8m0(scales: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Power-of-two float32 scales (tokens, groups) packed as UE8M0: each scale's biased exponent, group ``4j + b``
    in byte ``b`` of int32 column ``j`` (unused bytes 0), into ``out`` or a new :func:`ue8m0_empty` tensor."""
    tokens, groups = scales.shape
    exponents = (scales.float().contiguous().view(torch.int32) >> 23) & 0xFF
    padded = torch.zeros(tokens, -(-groups // 4) * 4, dtype=torch.int64, device=scales.device)
    padded[:, :groups] = exponents
    lanes = padded.view(tokens, -1, 4)
    word = lanes[..., 0] | (lanes[..., 1] << 8) | (lanes[..., 2] << 16) | (lanes[..., 3] << 24)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # two's complement
    out = ue8m0_empty(tokens, groups, scales.device) if out is None else out
    out.copy_(word)
    return out


def unpack_ue8m0(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """The float32 scales (tokens, groups) that :func:`pack_ue8m0` packed (``2 ** (exponent - 127)``)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    lanes = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1).reshape(packed.shape[0], -1)
    return torch.pow(2.0, lanes[:, :groups].double() - 127).float()


def moe_finalize(call: FusedCall, dtype: torch.dtype) -> torch.Tensor:
    """This rank's MoE finalize ``sum_k scales[t, k] * expert_out[idx[t, k]] (+ shared[t])`` in fp32, rounded to
    ``dtype``. An index outside ``[0, P)`` contributes nothing (the caller checks or records it)."""
    rows = call.x.shape[0]
    idx = call.expert_idx.long()
    valid = (idx >= 0) & (idx < rows)
    gathered = call.x[idx.clamp(0, max(rows - 1, 0))].float()  # (tokens, top_k, hidden)
    # a bad index's stand-in row is dropped, not weighted by 0 (0 * inf would be NaN)
    terms = torch.where(valid.unsqueeze(-1), gathered * call.expert_scales.float().unsqueeze(-1),
                        torch.zeros((), device=idx.device))
    x = terms.sum(dim=1)
    if call.shared is not None:
        x = x + call.shared.float()
    return x.to(dtype)


def epilogue(spec: FusionSpec, summed: torch.Tensor, call: FusedCall) -> None:
    """Write the call's outputs given the already-allreduced ``summed`` (tokens, hidden), for a spec with a norm."""
    s = summed.float()
    if spec.residual:
        s = s + call.residual.float()
        call.residual_out.copy_(s)
    norm = rmsnorm_fp32(s, call.weight, call.eps, call.weight_offset if spec.weight_offset else 0.0)
    if spec.quant is Quant.NONE:
        call.out.copy_(norm)
        return
    if spec.also_norm:
        call.norm_out.copy_(norm)
    if spec.quant is Quant.FP8_STATIC:
        call.out.copy_(quantize_fp8(norm, call.scale))
        return
    scales = dynamic_scales(spec, norm)
    call.out.copy_(quantize_fp8(norm, expand_scales(scales, norm.shape[1])))
    if spec.scale_layout is ScaleLayout.UE8M0:
        pack_ue8m0(scales, call.scale_out)
    else:
        call.scale_out.copy_(scales)
