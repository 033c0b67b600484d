"""The output tensors a :class:`~arfuse.core.spec.FusionSpec` writes: which ones, their shapes, dtypes and
layouts, checked when the caller provides them and allocated (one ``torch.empty`` each) when not.

Names are the :class:`~arfuse.core.types.FusedCall` slots: ``out`` (the sum without a norm, else the quantized
output, else the norm), ``residual_out``, ``norm_out`` (the norm besides a quantized ``out``) and ``scale_out``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from arfuse.core import validate as v
from arfuse.core.math import ue8m0_empty
from arfuse.core.spec import FusionSpec, ScaleLayout
from arfuse.core.types import FP8_DTYPE


def names(spec: FusionSpec) -> Tuple[str, ...]:
    """The outputs ``spec`` writes, ``out`` first."""
    found = ["out"]
    if spec.residual:
        found.append("residual_out")
    if spec.also_norm:
        found.append("norm_out")
    if spec.dynamic_scale:
        found.append("scale_out")
    return tuple(found)


def out_dtype(spec: FusionSpec, dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``out`` for inputs of ``dtype``."""
    return FP8_DTYPE if spec.quant else dtype


def scale_shape(spec: FusionSpec, tokens: int, hidden: int) -> Tuple[int, int]:
    groups = spec.groups(hidden)
    return (tokens, -(-groups // 4)) if spec.scale_layout is ScaleLayout.UE8M0 else (tokens, groups)


def _empty(spec: FusionSpec, name: str, tokens: int, hidden: int, dtype: torch.dtype, device) -> torch.Tensor:
    if name == "scale_out":
        if spec.scale_layout is ScaleLayout.UE8M0:
            return ue8m0_empty(tokens, spec.groups(hidden), device)
        return torch.empty(scale_shape(spec, tokens, hidden), dtype=torch.float32, device=device)
    return torch.empty((tokens, hidden), dtype=out_dtype(spec, dtype) if name == "out" else dtype, device=device)


def check_given(op: str, spec: FusionSpec, name: str, label: str, t, tokens: int, hidden: int,
                dtype: torch.dtype, device) -> torch.Tensor:
    """A caller-provided output ``t`` (called ``label`` in errors) must match what :func:`_empty` would make."""
    if name != "scale_out":
        want = out_dtype(spec, dtype) if name == "out" else dtype
        return v.check_tensor(op, label, t, dtype=want, device=device, shape=(tokens, hidden))
    shape = scale_shape(spec, tokens, hidden)
    if spec.scale_layout is not ScaleLayout.UE8M0:
        return v.check_tensor(op, label, t, dtype=torch.float32, device=device, shape=shape)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.device != torch.device(device) or tuple(t.shape) != shape:
        raise ValueError(f"{op}: {label} must be an int32 tensor of shape {shape} on {device}, got "
                         f"{v.dtype_name(t.dtype)} {tuple(t.shape)} on {t.device}")
    stride = (1, -(-tokens // 4) * 4)
    if (shape[1] > 1 and t.stride()[1] != stride[1]) or (tokens > 1 and t.stride()[0] != 1):
        raise ValueError(f"{op}: {label} must be column-major with the token stride padded to a multiple of 4 "
                         f"(strides {stride}, as arfuse.core.math.ue8m0_empty makes), got {t.stride()}")
    return t


def prepare(op: str, spec: FusionSpec, tokens: int, hidden: int, dtype: torch.dtype, device,
            given: Dict[str, Optional[torch.Tensor]], labels: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Every output ``spec`` writes: the caller's (checked) where ``given`` has one, else a new tensor.
    ``labels`` maps slot names to the argument names the op's caller knows (for error messages)."""
    result = {}
    for name in names(spec):
        t = given.get(name)
        result[name] = (_empty(spec, name, tokens, hidden, dtype, device) if t is None else
                        check_given(op, spec, name, labels.get(name, name), t, tokens, hidden, dtype, device))
    for name, t in given.items():
        if t is not None and name not in result:
            raise ValueError(f"{op}: {labels.get(name, name)} is not written by this call ({spec.name})")
    return result
