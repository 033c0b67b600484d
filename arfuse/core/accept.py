"""The acceptance tests of one spec, generated from its operand table (:mod:`arfuse.core.operands`) as one
straight-line Python function: what a loop over the table would test, without the loop (the loop cost ~1 µs per
call on a CPU, a tenth of one torch op). As ``dataclasses`` writes ``__init__``, :func:`source` writes the text
and :func:`compile_accept` makes the function; print the text to read what a spec's calls are tested for:

>>> import torch
>>> from arfuse.core.spec import FusionSpec
>>> from arfuse.core.types import Capacity
>>> print(source(FusionSpec(residual=False), Capacity(8, 16, torch.float32, torch.device("cpu"))))
def accept(call, inplace):
    x = call.x
    if type(x) is not Tensor:
        return False
    xs = x.shape
    if len(xs) != 2 or xs[1] != 16 or x.dtype is not DTYPE or not x.is_contiguous() or x.device != DEVICE:
        return False
    n = xs[0]
    if n > 8:
        return False
    rows = xs
    t = call.weight  # weight: (hidden,), the input dtype
    if not ((type(t) is Tensor or type(t) is Parameter) and t.dtype is DTYPE and t.shape == HIDDEN_SHAPE
            and t.is_contiguous() and t.device == DEVICE):
        return False
    eps = call.eps
    if type(eps) is not float or not TINIEST <= eps <= LARGEST:
        return False
    if type(call.weight_offset) is not float or call.weight_offset != 0.0:
        return False
    if (call.residual is not None or call.scale is not None or call.expert_idx is not None
            or call.expert_scales is not None or call.shared is not None):
        return False
    if inplace is not False:
        return False
    if call.residual_out is not None or call.norm_out is not None or call.scale_out is not None:
        return False
    given = ()
    t = call.out  # out: (tokens, hidden), the input dtype
    if t is not None:
        if not ((type(t) is Tensor or type(t) is Parameter) and t.dtype is DTYPE and t.shape == rows
                and t.is_contiguous() and t.device == DEVICE):
            return False
        given += (t,)
    if given and may_overlap(call, given, False):
        return False
    if call.out is None:
        call.out = empty_like(x)
    call.eps, call.num_tokens = eps, n
    return True
<BLANKLINE>

The function takes a :class:`~arfuse.core.types.FusedCall` holding the caller's values by slot and the
``inplace`` argument. It returns True after completing the call (missing outputs allocated, the residual as
``residual_out`` in place, eps and the static scale normalised, ``num_tokens`` set), or False with the call
untouched: then the full checks decide (:meth:`arfuse.core.prepare.Preparation.check`). It accepts nothing they
refuse.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from arfuse.core import operands as ops
from arfuse.core.math import ue8m0_empty
from arfuse.core.operands import DType, Layout, Operand, Shape
from arfuse.core.spec import FusionSpec, Quant
from arfuse.core.types import FP8_DTYPE, Capacity, FusedCall
from arfuse.core.validate import FLOAT32_MAX, FLOAT32_TINIEST

Accept = Callable[[FusedCall, object], bool]
_DTYPE_NAMES = {DType.INPUT: "DTYPE", DType.FP8: "FP8", DType.FLOAT32: "FLOAT32", DType.INT32: "INT32"}


def _fits(t: str, dtype: str, shape: str) -> List[str]:
    """Lines: return False unless tensor ``t`` is a plain tensor of ``dtype`` and ``shape``, contiguous, on the
    device (what ``validate.check_tensor`` accepts, for exact tensor types)."""
    return [f"if not ((type({t}) is Tensor or type({t}) is Parameter) and {t}.dtype is {dtype} and {t}.shape == "
            f"{shape}",
            f"        and {t}.is_contiguous() and {t}.device == DEVICE):",
            "    return False"]


def _head(spec: FusionSpec, cap: Capacity) -> List[str]:
    """The input (``x``, or the expert rows and their routing) and the token count ``n``."""
    lines = ["x = call.x", "if type(x) is not Tensor:", "    return False", "xs = x.shape",
             f"if len(xs) != 2 or xs[1] != {cap.hidden_size} or x.dtype is not DTYPE or not x.is_contiguous() "
             f"or x.device != DEVICE:", "    return False"]
    if spec.group_size and cap.hidden_size % spec.group_size:
        return lines + ["return False  # the group size does not divide the hidden size: the full check says so"]
    if spec.moe:
        return lines + ["n = moe_tokens(call)", "if n < 0:", "    return False",
                        f"rows = Size((n, {cap.hidden_size}))"]
    return lines + ["n = xs[0]", f"if n > {cap.max_tokens}:", "    return False", "rows = xs"]


def _inputs(spec: FusionSpec) -> List[str]:
    """The tensor inputs after ``x``, then the scalars and the in-place flag."""
    lines = []
    for o in ops.inputs(spec):
        if o.slot in ("residual", "weight", "shared"):
            lines.append(f"t = call.{o.slot}  # {ops.describe(o)}")
            lines += _fits("t", _DTYPE_NAMES[o.dtype], "rows" if o.shape is Shape.ROWS else "HIDDEN_SHAPE")
    if spec.norm:
        lines += ["eps = call.eps", "if type(eps) is not float or not TINIEST <= eps <= LARGEST:", "    return False"]
    if spec.quant is Quant.FP8_STATIC:
        lines += ["scale = static_scale(call.scale)", "if scale is None:", "    return False"]
    if spec.weight_offset:  # NaN fails the range test too
        lines += ["wo = call.weight_offset",
                  "if type(wo) is not float or not -LARGEST <= wo <= LARGEST:", "    return False"]
    else:
        lines += ["if type(call.weight_offset) is not float or call.weight_offset != 0.0:", "    return False"]
    taken = {o.slot for o in ops.inputs(spec)}
    lines += _all_none([s for s in ops.INPUT_SLOTS if s not in taken])  # the full check names any it finds
    if spec.residual:
        return lines + ["if inplace is not False and (inplace is not True or call.residual_out is not None):",
                        "    return False"]
    return lines + ["if inplace is not False:", "    return False"]


def _given(spec: FusionSpec) -> List[str]:
    """The caller's outputs: none for a slot the spec does not write, each fit, none overlapping anything."""
    lines = _all_none([s for s in ops.OUTPUT_SLOTS if s not in ops.names(spec)])
    lines.append("given = ()")
    for o in ops.outputs(spec):
        lines += [f"t = call.{o.slot}  # {ops.describe(o)}", "if t is not None:"]
        if o.layout is Layout.UE8M0:
            lines.append("    return False  # a caller's packed scales: their strides are the full check's")
            continue
        shape = "rows" if o.shape is Shape.ROWS else f"(n, {o.slot}_columns)"
        lines += ["    " + line for line in _fits("t", _DTYPE_NAMES[o.dtype], shape)] + ["    given += (t,)"]
    inplace = "inplace" if spec.residual else "False"
    check = "(given or inplace)" if spec.residual else "given"
    return lines + [f"if {check} and may_overlap(call, given, {inplace}):", "    return False"]


def _all_none(slots: List[str]) -> List[str]:
    """Lines: return False unless every slot of ``slots`` (ones the spec does not have) is None."""
    if not slots:
        return []
    tests = [f"call.{s} is not None" for s in slots]
    rows = [" or ".join(tests[i:i + 3]) for i in range(0, len(tests), 3)]
    if len(rows) == 1:
        return [f"if {rows[0]}:", "    return False"]
    return [f"if ({rows[0]}"] + [f"        or {row}" for row in rows[1:-1]] + [f"        or {rows[-1]}):",
                                                                          "    return False"]


def _allocate(spec: FusionSpec) -> List[str]:
    """Every output the caller left empty: the residual in place, else one new tensor."""
    like = "call.residual" if spec.moe else "x"
    lines = []
    for o in ops.outputs(spec):
        lines.append(f"if call.{o.slot} is None:")
        if o.slot == "residual_out":
            lines.append(f"    call.residual_out = call.residual if inplace else empty_like({like})")
        else:
            lines.append(f"    call.{o.slot} = {_new(o, like)}")
    done = "call.eps, call.num_tokens = " + ("eps" if spec.norm else "1.0") + ", n"
    if spec.quant is Quant.FP8_STATIC:
        done += "\ncall.scale = scale"
    return lines + done.split("\n") + ["return True"]


def _new(o: Operand, like: str) -> str:
    if o.layout is Layout.UE8M0:
        return f"ue8m0_empty(n, {o.slot}_groups, DEVICE)"
    if o.shape is not Shape.ROWS:
        return f"empty(n, {o.slot}_columns, dtype={_DTYPE_NAMES[o.dtype]}, device=DEVICE)"
    return f"empty_like({like})" if o.dtype is DType.INPUT else f"empty_like({like}, dtype={_DTYPE_NAMES[o.dtype]})"


def source(spec: FusionSpec, cap: Capacity) -> str:
    """The text of the acceptance function of ``spec`` for fusion objects of ``cap``."""
    body = _head(spec, cap)
    if body[-1].startswith("return False"):
        return "\n".join(["def accept(call, inplace):"] + ["    " + line for line in body]) + "\n"
    body += _inputs(spec) + _given(spec) + _allocate(spec)
    return "\n".join(["def accept(call, inplace):"] + ["    " + line for line in body]) + "\n"


def compile_accept(spec: FusionSpec, cap: Capacity, helpers: Dict[str, Callable]) -> Accept:
    """The acceptance function of ``spec``; ``helpers``: ``moe_tokens(call)``, ``static_scale(scale)`` and
    ``may_overlap(call, given, inplace)`` of the preparation step."""
    names = dict(helpers, Tensor=torch.Tensor, Parameter=torch.nn.Parameter, Size=torch.Size,
                 empty=torch.empty, empty_like=torch.empty_like,
                 ue8m0_empty=ue8m0_empty, DTYPE=cap.dtype, DEVICE=cap.device, FP8=FP8_DTYPE,
                 FLOAT32=torch.float32, INT32=torch.int32, HIDDEN_SHAPE=torch.Size((cap.hidden_size,)),
                 TINIEST=FLOAT32_TINIEST, LARGEST=FLOAT32_MAX)
    for o in ops.outputs(spec):
        if o.shape is not Shape.ROWS:
            names[f"{o.slot}_columns"] = ops.shape_of(o, spec, 0, cap.hidden_size)[1]
            names[f"{o.slot}_groups"] = spec.groups(cap.hidden_size)
    exec(compile(source(spec, cap), f"<arfuse accept {spec.name}>", "exec"), names)  # noqa: S102 - our own text
    return names["accept"]
