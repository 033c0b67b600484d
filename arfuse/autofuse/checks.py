"""What a structural match must also satisfy before it is replaced: the values the pattern left open.

:func:`why_not` returns None when the fused op computes what the matched nodes compute (within the dtype's
rounding), else the reason it would not. Anything it cannot prove (a symbolic hidden size, a broadcast residual,
a weight of another dtype, a view that splits the hidden dim) is a reason: the pass leaves such a graph alone.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from arfuse.autofuse import views
from arfuse.autofuse.patterns import Entry
from arfuse.core.types import FP8_DTYPE, FP8_MAX
from arfuse.core.validate import SUPPORTED_DTYPES, _positive_in_float32, dtype_name

DEVICE_TYPES = ("cpu", "cuda")


def val(node) -> Optional[torch.Tensor]:
    """The fake tensor an FX node computes (None for a constant or a node without one)."""
    meta = getattr(node, "meta", None)
    v = meta.get("val") if meta else None
    return v if isinstance(v, torch.Tensor) else None


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_cpu_scalar(node) -> bool:
    """A 0-d floating-point CPU tensor: how a graph compiled with ``dynamic=True`` takes a float attribute."""
    v = val(node)
    return v is not None and v.dim() == 0 and v.dtype.is_floating_point and v.device.type == "cpu"


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(p == q) for p, q in zip(a.shape, b.shape))


def _reduces_last_dim(dims, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


MAX_PLAIN_HIDDEN = 16384


def _last(chain, default: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return val(chain[-1]) if chain else default


def branch_val(kw: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The allreduced sum as the residual add (or, without one, the norm) takes it: after its row views."""
    return _last(kw.get("sum_views", ()), val(kw["x"]))


def addend_sum_val(kw: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """What the residual add takes from the allreduced branch: the branch, or the branch plus the addend (as
    shaped as the branch: no broadcast passes the checks) after their row views."""
    if "addend" not in kw:
        return branch_val(kw)
    return _last(kw.get("addend_views", ()), branch_val(kw))


def norm_input_val(kw: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The RMSNorm's input: the residual sum (the residual's shape) or the allreduced branch, after its views."""
    if "residual" in kw:
        return _last(kw.get("norm_views", ()), val(kw["residual"]))
    return branch_val(kw)


def why_not(entry: Entry, kw: Mapping[str, Any]) -> Optional[str]:
    """None if ``entry``'s match with keyword values ``kw`` may be fused, else why not."""
    x = val(kw["x"])
    if x is None:
        return "allreduce input has no tensor metadata"
    if not isinstance(kw["group"], str):
        return "process group is not given by name"
    if x.device.type not in entry.device_types:
        return f"{entry.op}: no arfuse fast path on {x.device.type}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype_name(x.dtype)}: arfuse fuses float32/bfloat16/float16"
    if x.dim() < 1:
        return "allreduce of a 0-d tensor"
    if entry.norm is None:
        # the plain allreduce: a fusion object sized max_tokens x the last dim; only for activation-shaped sums
        if x.dim() < 2 or not isinstance(x.shape[-1], int) or not 1 <= x.shape[-1] <= MAX_PLAIN_HIDDEN:
            return (f"all_reduce of shape {tuple(x.shape)}: arfuse's all_reduce takes (tokens, hidden) activations "
                    f"with hidden <= {MAX_PLAIN_HIDDEN}")
        return None
    return (_views_reason(kw, x) or _norm_reason(entry, kw, x) or _residual_reason(entry, kw, x)
            or _fp8_reason(entry, kw, x))


def _views_reason(kw, x: torch.Tensor) -> Optional[str]:
    chain = tuple(kw.get("sum_views", ())) + tuple(kw.get("addend_views", ())) + tuple(kw.get("norm_views", ()))
    why = views.why_not_rows(chain, x.shape[-1])
    if why is not None:
        return why
    target = norm_input_val(kw)
    if chain and target is not None and views.out_shape(target, [("x", x), ("residual", val(kw.get("residual")))]) \
            is None:
        return (f"the RMSNorm's input shape {tuple(target.shape)} after the views has more than one dynamic dim: "
                f"the fused call's output cannot be viewed back to it")
    return None


def _norm_reason(entry: Entry, kw, x: torch.Tensor) -> Optional[str]:
    lowp = x.dtype != torch.float32
    if entry.casts != lowp:
        return (f"RMSNorm of a {dtype_name(x.dtype)} tensor computed without an fp32 upcast: arfuse computes it "
                f"in fp32" if lowp else "fp32 graph with casts around the RMSNorm")
    up, out = kw.get("up_dtype", torch.float32), kw.get("out_dtype", x.dtype)
    if up != torch.float32 or out != x.dtype:
        return (f"RMSNorm casts to {up} and back to {out}, not float32 and back to {dtype_name(x.dtype)}")
    h = norm_input_val(kw)
    if not _reduces_last_dim(kw["dims"], h.dim() if h is not None else x.dim()):
        return f"the mean reduces dims {kw['dims']}, not the last one"
    eps = kw["eps"]
    if isinstance(eps, torch.fx.Node):
        if not _is_cpu_scalar(eps):
            return "eps is a tensor, not a constant or a 0-d CPU scalar"
    elif not _is_number(eps) or not math.isfinite(eps) or eps <= 0 or not _positive_in_float32(eps):
        return f"eps {eps!r} is not a positive float32 constant"
    if entry.norm.weight_offset:
        offset = kw["weight_offset"]
        if not _is_number(offset) or not math.isfinite(offset):
            return f"the weight is offset by {offset!r}, not by a finite constant"
    weight = val(kw["weight"])
    if weight is None:
        return "RMSNorm weight is not a tensor"
    if weight.dim() != 1 or not statically_known_true(weight.shape[0] == x.shape[-1]):
        return f"RMSNorm weight of shape {tuple(weight.shape)} for hidden size {x.shape[-1]}"
    if weight.dtype != x.dtype:
        return f"RMSNorm weight is {dtype_name(weight.dtype)}, the activations {dtype_name(x.dtype)}"
    if weight.device != x.device:
        return f"RMSNorm weight on {weight.device}, the activations on {x.device}"
    return None


def _residual_reason(entry: Entry, kw, x: torch.Tensor) -> Optional[str]:
    if not entry.residual.add:
        return None
    residual = val(kw["residual"])
    if residual is None:
        return "residual is not a tensor"
    if residual.dtype != x.dtype or residual.device != x.device:
        return f"residual is {dtype_name(residual.dtype)} on {residual.device}, the sum {dtype_name(x.dtype)} " \
               f"on {x.device}"
    if "addend" in kw:
        addend, sum_ = val(kw["addend"]), branch_val(kw)
        if addend is None or sum_ is None:
            return "the term added to the sum is not a tensor"
        if addend.dtype != x.dtype or addend.device != x.device or not _same_shape(addend, sum_):
            return (f"the term added to the sum is {dtype_name(addend.dtype)} of shape {tuple(addend.shape)} on "
                    f"{addend.device}, the sum {dtype_name(x.dtype)} of shape {tuple(sum_.shape)} on {x.device}")
    branch = addend_sum_val(kw)
    if branch is None or not _same_shape(residual, branch):
        shape = tuple(branch.shape) if branch is not None else "unknown"
        return f"residual of shape {tuple(residual.shape)} broadcasts against the sum's {shape}"
    if entry.residual.scaled:
        m = kw["multiplier"]
        if isinstance(m, torch.fx.Node):
            if not _is_cpu_scalar(m):
                return "the allreduced branch is scaled by a tensor, not a constant or a 0-d CPU scalar"
        elif not _is_number(m) or not math.isfinite(m):
            return f"the allreduced branch is scaled by {m!r}, not by a finite constant"
    return None


def _fp8_reason(entry: Entry, kw, x: torch.Tensor) -> Optional[str]:
    if entry.epilogue is None:
        return None
    if kw["q_dtype"] != FP8_DTYPE:
        return f"quantizes to {kw['q_dtype']}, not {FP8_DTYPE}"
    if kw["qmin"] != -FP8_MAX or kw["qmax"] != FP8_MAX:
        return f"clamps to [{kw['qmin']}, {kw['qmax']}], not [-{FP8_MAX:g}, {FP8_MAX:g}]"
    scale = kw["scale"]
    if _is_number(scale):
        return None if math.isfinite(scale) and scale > 0 and _positive_in_float32(scale) else \
            f"FP8 scale {scale!r} is not a positive float32"
    s = val(scale)
    if s is None or s.numel() != 1 or s.dtype != torch.float32 or s.device != x.device:
        return "FP8 scale is not a one-element float32 tensor on the activations' device (static per-tensor)"
    return None
