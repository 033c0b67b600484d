"""The public ops as data: which :class:`~arfuse.core.spec.FusionSpec` fields each op fixes, and how a call's
arguments pick the rest (``weight_offset``, ``quant=``, ``also_norm=``, a shared expert's output).

>>> spec_for(RESIDUAL_RMSNORM_QUANT, 1.0, FP8PerToken(), also_norm=True).name
'residual_rmsnorm+offset+fp8_per_token+norm'
>>> spec_for(RMSNORM, 0.0) is spec_for(RMSNORM, 0.0)  # interned
True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from arfuse.core.quant import QUANT_TYPES, FP8PerToken, FP8PerTokenGroup, FP8Static
from arfuse.core.spec import FusionSpec, Prologue, Quant
from arfuse.core.validate import FLOAT32_MAX, check_weight_offset


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a cache key on every call
class PublicOp:
    """One public op: its ``name`` (errors start with it) and what it fixes of the spec. ``quant``: takes
    ``quant=`` and ``also_norm=`` (required unless ``moe``); ``static_fp8``: the FP8 op with its own ``scale``."""

    name: str
    residual: bool = True
    norm: bool = True
    moe: bool = False
    quant: bool = False
    static_fp8: bool = False

    def __str__(self) -> str:
        return self.name


RESIDUAL_RMSNORM = PublicOp("residual_rmsnorm")
RESIDUAL_RMSNORM_FP8 = PublicOp("residual_rmsnorm_fp8", static_fp8=True)
RESIDUAL_RMSNORM_QUANT = PublicOp("residual_rmsnorm_quant", quant=True)
MOE_FINALIZE_RESIDUAL_RMSNORM = PublicOp("moe_finalize_residual_rmsnorm", moe=True, quant=True)
RMSNORM = PublicOp("rmsnorm", residual=False)
ALL_REDUCE = PublicOp("all_reduce", residual=False, norm=False)

_SPECS: Dict[tuple, FusionSpec] = {}
_PLAIN: Dict[PublicOp, Tuple[FusionSpec, FusionSpec]] = {}  # op -> (its spec without, with a weight offset)
_KEYED_BY_VALUE = (FP8PerToken, FP8PerTokenGroup)  # hashable, equal when they pick the same spec fields


def spec_for(op: PublicOp, weight_offset=0.0, quant=None, also_norm=False, shared: bool = False) -> FusionSpec:
    """The (interned) spec of a call of ``op`` with these arguments. A bad ``weight_offset``, ``quant`` or
    ``also_norm`` raises ValueError/TypeError naming ``op`` and the argument."""
    if quant is None and also_norm is False and shared is False and type(weight_offset) is float \
            and -FLOAT32_MAX <= weight_offset <= FLOAT32_MAX:  # the common calls: one lookup
        pair = _PLAIN.get(op)
        if pair is not None:
            return pair[weight_offset != 0.0]
        pair = _PLAIN[op] = (_derive(op, 0.0, None, False, False), _derive(op, 1.0, None, False, False))
        return pair[weight_offset != 0.0]
    key = _key(op, weight_offset, quant, also_norm, shared)
    spec = _SPECS.get(key) if key is not None else None
    if spec is None:
        spec = _derive(op, weight_offset, quant, also_norm, shared)
        if key is not None:
            spec = _SPECS.setdefault(key, spec)  # atomic: two threads deriving it keep one
    return spec


def _key(op: PublicOp, weight_offset, quant, also_norm, shared: bool) -> Optional[tuple]:
    """The cache key of a call whose arguments need no check beyond a few comparisons, else None."""
    if type(weight_offset) is not float or not -FLOAT32_MAX <= weight_offset <= FLOAT32_MAX:
        return None
    if also_norm is not False and also_norm is not True:
        return None
    kind = type(quant)
    if kind in _KEYED_BY_VALUE:
        q = quant
    elif kind is FP8Static or quant is None:
        q = kind
    else:
        return None
    return op, weight_offset != 0.0, q, also_norm, shared


def _derive(op: PublicOp, weight_offset, quant, also_norm, shared: bool) -> FusionSpec:
    """The spec, every argument checked (the errors' order is the arguments')."""
    offset = check_weight_offset(op.name, weight_offset)
    fields = dict(residual=op.residual, norm=op.norm, weight_offset=offset != 0.0)
    if op.static_fp8:
        fields["quant"] = Quant.FP8_STATIC
    if op.quant:
        if quant is not None or not op.moe:
            if not isinstance(quant, QUANT_TYPES):
                raise TypeError(f"{op}: quant must be arfuse.FP8Static(scale), arfuse.FP8PerToken() or "
                                f"arfuse.FP8PerTokenGroup(...), got {type(quant).__name__}")
            fields.update(quant.spec_fields())
        if not isinstance(also_norm, bool):
            raise TypeError(f"{op}: also_norm must be a bool, got {type(also_norm).__name__}")
        if also_norm and quant is None:
            raise ValueError(f"{op}: also_norm=True needs a quant= (without one the norm is the output)")
        fields["also_norm"] = also_norm
    if op.moe:
        fields.update(prologue=Prologue.MOE_FINALIZE, shared_expert=shared)
    return FusionSpec(**fields)


def static_scale(quant):
    """The static FP8 scale a ``quant=`` argument carries (its ``scale``), else None."""
    return quant.scale if isinstance(quant, FP8Static) else None
