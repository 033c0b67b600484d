"""The quantization choices a caller passes as ``quant=``: each names the :class:`FusionSpec` fields it sets.

>>> FP8PerTokenGroup(group_size=64, packed_ue8m0=True).spec_fields()
{'quant': <Quant.FP8_PER_TOKEN_GROUP: 3>, 'group_size': 64, 'scale_layout': <ScaleLayout.UE8M0: 2>}
>>> FP8PerTokenGroup(group_size=0)
Traceback (most recent call last):
...
ValueError: FP8PerTokenGroup: group_size must be a positive int, got 0
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Union

import torch

from arfuse.core.spec import MAX_GROUP_SIZE, Quant, ScaleLayout


@dataclass(frozen=True, eq=False)
class FP8Static:
    """Static per-tensor FP8 e4m3: ``quant = clamp(norm / scale, -448, 448)`` with the caller's ``scale`` (a
    positive float or a one-element float32 tensor on the fusion object's device, checked at the call)."""

    scale: Union[float, torch.Tensor]

    def spec_fields(self) -> dict:
        return {"quant": Quant.FP8_STATIC}


@dataclass(frozen=True)
class FP8PerToken:
    """Dynamic per-token FP8 e4m3: per token ``scale = max(amax(|norm|) / 448, 1 / (512 * 448))`` (float32,
    shape (tokens, 1)) and ``quant = norm / scale``."""

    def spec_fields(self) -> dict:
        return {"quant": Quant.FP8_PER_TOKEN, "scale_layout": ScaleLayout.FP32}


@dataclass(frozen=True)
class FP8PerTokenGroup:
    """Dynamic per-token-group FP8 e4m3 (DeepGEMM's activation format): one scale per token and group of
    ``group_size`` columns (must divide the hidden size), ``scale = max(amax(|group|) / 448, 1e-10)``.

    ``packed_ue8m0=False``: float32 scales of shape (tokens, hidden / group_size). ``True``: each scale rounded
    up to a power of two and stored as its 8-bit biased exponent, 4 consecutive groups per int32 (group ``4j + b``
    in byte ``b``), an int32 tensor of shape (tokens, ceil(groups / 4)) stored column-major with the token stride
    padded to a multiple of 4 (what DeepGEMM's and FlashInfer's per-token-group patterns take)."""

    group_size: int = 128
    packed_ue8m0: bool = False

    def __post_init__(self) -> None:
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or not 0 < g <= MAX_GROUP_SIZE:
            raise ValueError(f"FP8PerTokenGroup: group_size must be a positive int, got {g!r}")
        if not isinstance(self.packed_ue8m0, bool):
            raise TypeError(f"FP8PerTokenGroup: packed_ue8m0 must be a bool, got {type(self.packed_ue8m0).__name__}")

    def spec_fields(self) -> dict:
        layout = ScaleLayout.UE8M0 if self.packed_ue8m0 else ScaleLayout.FP32
        return {"quant": Quant.FP8_PER_TOKEN_GROUP, "group_size": int(self.group_size), "scale_layout": layout}


QUANT_TYPES = (FP8Static, FP8PerToken, FP8PerTokenGroup)
