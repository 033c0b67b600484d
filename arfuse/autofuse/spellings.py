"""The model code the fusion pass's patterns are traced from: each RMSNorm spelling, residual form and FP8
epilogue as the plain torch code models write. ``arfuse.autofuse.tracing`` traces these through Inductor's own
decompositions, so the patterns hold whatever aten ops this torch release turns them into.

A value a pattern leaves open (eps, the branch's scale, Gemma's weight offset, the FP8 clamp bounds and a float
scale) is written as a sentinel: a constant exact in float32 that no decomposition produces by itself, which the
tracer turns into a named pattern argument for ``checks`` to judge.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from arfuse.core.types import FP8_DTYPE

EPS = 3 * 2.0 ** -18
MULTIPLIER = 0.3125
WEIGHT_OFFSET = 0.6875
QMIN, QMAX = -0.8125, 0.9375
FLOAT_SCALE = 0.5625

SENTINELS: Dict[float, str] = {EPS: "eps", MULTIPLIER: "multiplier", WEIGHT_OFFSET: "weight_offset",
                               QMIN: "qmin", QMAX: "qmax", FLOAT_SCALE: "scale"}


# -- RMSNorm spellings: (h, weight) -> normed -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def hf_rmsnorm(weight_after_cast: bool, weight_first: bool) -> Callable:
    """HF's ``LlamaRMSNorm`` (weight applied after the downcast, weight first) and its variants."""
    def norm(h, weight):
        dtype = h.dtype
        h32 = h.to(torch.float32)
        variance = h32.pow(2).mean(-1, keepdim=True)
        h32 = h32 * torch.rsqrt(variance + EPS)
        if weight_after_cast:
            y = h32.to(dtype)
            return weight * y if weight_first else y * weight
        return (weight * h32 if weight_first else h32 * weight).to(dtype)

    return norm


def torch_rms_norm(h, weight):
    """``F.rms_norm`` (and ``nn.RMSNorm``, which calls it)."""
    return F.rms_norm(h, (h.shape[-1],), weight, EPS)


@functools.lru_cache(maxsize=None)
def offset_rmsnorm(weight_first: bool) -> Callable:
    """Gemma's RMSNorm: fp32 math, the weight applied as ``offset + weight`` in fp32, then the downcast."""
    def norm(h, weight):
        h32 = h.float()
        normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)
        scale = WEIGHT_OFFSET + weight.float()
        return (scale * normed if weight_first else normed * scale).type_as(h)

    return norm


# -- residual forms: (residual, allreduced sum) -> the norm's input ---------------------------------------------

RESIDUAL_FORMS: Dict[str, Callable] = {
    "residual+sum": lambda residual, y: residual + y,
    "sum+residual": lambda residual, y: y + residual,
    "residual+sum*m": lambda residual, y: residual + y * MULTIPLIER,
    "sum*m+residual": lambda residual, y: y * MULTIPLIER + residual,
}


# A term added to the allreduced sum before the residual add (a shared expert's output, replicated or allreduced on
# its own): (allreduced sum, addend) -> what the residual add takes in place of the sum.
ADDEND_FORMS: Dict[str, Callable] = {
    "sum+addend": lambda y, addend: y + addend,
    "addend+sum": lambda y, addend: addend + y,
}


# -- FP8 epilogues: (normed[, scale]) -> quantized ----------------------------------------------------------------

def fp8_static(y, scale):
    """Static per-tensor FP8 with the scale a float32 tensor."""
    return (y / scale).clamp(QMIN, QMAX).to(FP8_DTYPE)


def fp8_static_float_scale(y):
    """Static per-tensor FP8 with the scale a Python float (in bf16/fp16 the clamp then runs on an fp32 upcast)."""
    return (y / FLOAT_SCALE).clamp(QMIN, QMAX).to(FP8_DTYPE)
