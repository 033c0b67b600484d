"""A fused call described as data: :class:`FusionSpec` says what one call computes, and every layer reads it.

Validation, output allocation, the float64 reference, the torch math, selection, each backend and the FlashInfer
mapping read a spec's fields; none of them switches on a list of named patterns. A new pattern adds a field (or a
value of one) here, its math in :mod:`arfuse.core.math`, and its epilogue in each kernel.

Semantics (math in fp32; ``x`` is this rank's input, rounded to the input dtype before the allreduce)::

    x      = sum_k expert_scales[t, k] * expert_out[permuted_idx[t, k]] (+ shared[t])   # prologue MOE_FINALIZE
    s      = allreduce(x) (+ residual)                                                  # residual: residual_out = s
    y      = s * rsqrt(mean(s^2) + eps) * (weight + weight_offset)                      # norm
    quant  = fp8(clamp(y / scale, -448, 448))                                           # quant, scale by kind:
             FP8_STATIC: the caller's scale;  FP8_PER_TOKEN: max(amax_row(|y|) / 448, 1 / (512 * 448));
             FP8_PER_TOKEN_GROUP: max(amax_group(|y|) / 448, 1e-10) per ``group_size`` columns, rounded up to a
             power of two with the UE8M0 layout
    norm   = y in the input dtype (also written when ``also_norm``)

>>> s = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0)
>>> s.name
'residual_rmsnorm+fp8_group128_ue8m0'
>>> FusionSpec.from_code(s.code) == s
True
>>> sorted(s.features)
['fp8_group', 'norm', 'residual', 'ue8m0']
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import FrozenSet, Tuple


class Quant(enum.IntEnum):
    """How the normed output is quantized (FP8 e4m3 throughout)."""

    NONE = 0
    FP8_STATIC = 1  # per tensor, the caller's scale
    FP8_PER_TOKEN = 2  # dynamic, one fp32 scale per token
    FP8_PER_TOKEN_GROUP = 3  # dynamic, one scale per token and group of columns


class ScaleLayout(enum.IntEnum):
    """How dynamic scales are written."""

    NONE = 0  # no scale output (no quantization, or a static scale)
    FP32 = 1  # float32 (tokens, groups): groups = 1 per token, hidden / group_size per group
    UE8M0 = 2  # DeepGEMM's packed layout: int32 (tokens, ceil(groups / 4)), column-major, token stride padded to 4


class Prologue(enum.IntEnum):
    """What builds this rank's input from the caller's tensors before the allreduce."""

    NONE = 0  # the input is ``x`` itself
    MOE_FINALIZE = 1  # the weighted sum of each token's expert rows (+ the shared expert's row)


# Bit layout of FusionSpec.code: (field, shift, width). The kernels decode the same bits (kernels/_spec.py).
CODE_FIELDS: Tuple[Tuple[str, int, int], ...] = (
    ("residual", 0, 1), ("norm", 1, 1), ("weight_offset", 2, 1), ("quant", 3, 2), ("scale_layout", 5, 2),
    ("also_norm", 7, 1), ("prologue", 8, 2), ("shared_expert", 10, 1), ("group_size", 11, 16),
)
_TYPES = {"quant": Quant, "scale_layout": ScaleLayout, "prologue": Prologue}
MAX_GROUP_SIZE = (1 << 16) - 1


@dataclass(frozen=True)
class FusionSpec:
    """What one fused call computes (see the module docstring). Frozen and hashable; build it through the public
    ops, or directly for tests and tools. Inconsistent combinations raise ValueError."""

    residual: bool = True
    norm: bool = True
    weight_offset: bool = False  # the norm multiplies by (weight + offset) with a nonzero offset
    quant: Quant = Quant.NONE
    group_size: int = 0  # columns per scale, FP8_PER_TOKEN_GROUP only
    scale_layout: ScaleLayout = ScaleLayout.NONE
    also_norm: bool = False  # with a quantization: write the norm in the input dtype too
    prologue: Prologue = Prologue.NONE
    shared_expert: bool = False  # MOE_FINALIZE: add the shared expert's row
    code: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, kind in _TYPES.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        q = self.quant
        problems = []
        if q is not Quant.NONE and not self.norm:
            problems.append("a quantization needs the norm")
        if (q is Quant.FP8_PER_TOKEN_GROUP) != (self.group_size > 0):
            problems.append("group_size is set exactly for FP8_PER_TOKEN_GROUP")
        if not 0 <= self.group_size <= MAX_GROUP_SIZE:
            problems.append(f"group_size must be in 0..{MAX_GROUP_SIZE}")
        dynamic = q in (Quant.FP8_PER_TOKEN, Quant.FP8_PER_TOKEN_GROUP)
        if dynamic and self.scale_layout is ScaleLayout.NONE:
            problems.append("a dynamic quantization needs a scale layout")
        if not dynamic and self.scale_layout is not ScaleLayout.NONE:
            problems.append("only dynamic quantizations write scales")
        if self.scale_layout is ScaleLayout.UE8M0 and q is not Quant.FP8_PER_TOKEN_GROUP:
            problems.append("the UE8M0 layout is for per-token-group scales")
        if self.also_norm and q is Quant.NONE:
            problems.append("also_norm needs a quantization")
        if self.weight_offset and not self.norm:
            problems.append("weight_offset needs the norm")
        if self.prologue is Prologue.MOE_FINALIZE and not (self.residual and self.norm):
            problems.append("MoE finalize is fused with the residual add and the norm")
        if self.shared_expert and self.prologue is not Prologue.MOE_FINALIZE:
            problems.append("shared_expert needs the MoE finalize prologue")
        if problems:
            raise ValueError(f"FusionSpec: {'; '.join(problems)}")
        code = 0
        for name, shift, _ in CODE_FIELDS:
            code |= int(getattr(self, name)) << shift
        object.__setattr__(self, "code", code)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def from_code(code: int) -> "FusionSpec":
        """The spec whose :attr:`code` is ``code`` (the form that crosses the ``torch.library`` op)."""
        values = {}
        for name, shift, width in CODE_FIELDS:
            raw = (code >> shift) & ((1 << width) - 1)
            values[name] = _TYPES[name](raw) if name in _TYPES else (raw if width > 1 else bool(raw))
        return FusionSpec(**values)

    # -- derived facts -----------------------------------------------------------------------------------------
    @property
    def dynamic_scale(self) -> bool:
        """Whether the call writes scales (per token or per group)."""
        return self.scale_layout is not ScaleLayout.NONE

    @property
    def writes_norm(self) -> bool:
        """Whether the norm is written in the input dtype (the main output without a quantization)."""
        return self.norm and (self.quant is Quant.NONE or self.also_norm)

    @property
    def moe(self) -> bool:
        return self.prologue is Prologue.MOE_FINALIZE

    def groups(self, hidden: int) -> int:
        """Scales per token: 1 per token, hidden / group_size per group, 0 without dynamic scales."""
        if self.quant is Quant.FP8_PER_TOKEN:
            return 1
        if self.quant is Quant.FP8_PER_TOKEN_GROUP:
            return hidden // self.group_size
        return 0

    @property
    def features(self) -> FrozenSet[str]:
        """The capabilities a backend needs to run this spec (see ``backends.base.Support.features``)."""
        names = {"residual": self.residual, "norm": self.norm, "weight_offset": self.weight_offset,
                 "also_norm": self.also_norm, "moe_finalize": self.moe, "shared_expert": self.shared_expert,
                 "fp8_static": self.quant is Quant.FP8_STATIC, "fp8_per_token": self.quant is Quant.FP8_PER_TOKEN,
                 "fp8_group": self.quant is Quant.FP8_PER_TOKEN_GROUP,
                 "ue8m0": self.scale_layout is ScaleLayout.UE8M0}
        return frozenset(n for n, on in names.items() if on)

    @property
    def name(self) -> str:
        """A short stable name, e.g. ``moe_finalize+residual_rmsnorm+fp8_per_token+norm``."""
        if not self.norm:
            return "allreduce"
        parts = ["moe_finalize"] if self.moe else []
        parts.append(("residual_" if self.residual else "") + "rmsnorm")
        if self.shared_expert:
            parts.insert(1, "shared")
        if self.weight_offset:
            parts.append("offset")
        if self.quant is Quant.FP8_STATIC:
            parts.append("fp8")
        elif self.quant is Quant.FP8_PER_TOKEN:
            parts.append("fp8_per_token")
        elif self.quant is Quant.FP8_PER_TOKEN_GROUP:
            parts.append(f"fp8_group{self.group_size}" + ("_ue8m0" if self.scale_layout is ScaleLayout.UE8M0 else ""))
        if self.also_norm:
            parts.append("norm")
        return "+".join(parts)

    def __str__(self) -> str:
        return self.name


FEATURES: FrozenSet[str] = frozenset({"residual", "norm", "weight_offset", "also_norm", "moe_finalize",
                                      "shared_expert", "fp8_static", "fp8_per_token", "fp8_group", "ue8m0"})
CLASSIC_FEATURES: FrozenSet[str] = frozenset({"residual", "norm", "fp8_static"})  # the first four patterns'

ALLREDUCE = FusionSpec(residual=False, norm=False)
RMSNORM = FusionSpec(residual=False)
RESIDUAL_RMSNORM = FusionSpec()
RESIDUAL_RMSNORM_FP8 = FusionSpec(quant=Quant.FP8_STATIC)


def catalogue(group_size: int = 128) -> Tuple[FusionSpec, ...]:
    """One spec of every kind (each feature and each quantization, with and without the MoE prologue): what a
    fusion object plans for at construction, so it prepares every backend any of them may run on."""
    quants = [dict(), dict(quant=Quant.FP8_STATIC), dict(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
              dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=group_size, scale_layout=ScaleLayout.FP32),
              dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=group_size, scale_layout=ScaleLayout.UE8M0)]
    specs = [ALLREDUCE, RMSNORM, FusionSpec(residual=False, weight_offset=True)]
    for q in quants:
        for offset in (False, True):
            for also in ((False, True) if q else (False,)):
                specs.append(FusionSpec(weight_offset=offset, also_norm=also, **q))
                for shared in (False, True):
                    specs.append(FusionSpec(weight_offset=offset, also_norm=also, prologue=Prologue.MOE_FINALIZE,
                                            shared_expert=shared, **q))
    return tuple(dict.fromkeys(specs))
