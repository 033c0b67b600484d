"""What one call of a :class:`~arfuse.core.spec.FusionSpec` takes and returns, as data: the operand schema.

Each :class:`Operand` is one tensor of the call: its :class:`~arfuse.core.types.FusedCall` slot, the argument name
the public ops give it (errors name that), whether it is an input or an output, its shape, dtype and layout, and
the one input an output may share memory with. :func:`operands` derives a spec's operands; every other view of a
call is read off this table: the preparation step's acceptance tests and full checks
(:mod:`arfuse.core.prepare`), the allocation of missing outputs (:func:`allocate`), the ``torch.library`` op
schemas (:func:`op_schema`) and the compile pass's fake outputs.

Aliasing: inputs may share memory with each other (``x`` may be the residual). An output shares memory with no
input and no other output, except ``residual_out`` with ``residual`` (the in-place mode).

>>> from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
>>> [o.arg for o in operands(FusionSpec())]
['x', 'residual', 'weight', 'norm_out', 'residual_out']
>>> s = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0, also_norm=True)
>>> for o in outputs(s):
...     print(o.arg, o.dtype.name, o.shape.name)
quant_out FP8 ROWS
residual_out INPUT ROWS
norm_out INPUT ROWS
scale_out INT32 PACKED_SCALES
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from arfuse.core.math import ue8m0_empty
from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
from arfuse.core.types import FP8_DTYPE

# Every slot a call may fill, in the order the torch.library ops carry them.
INPUT_SLOTS = ("x", "residual", "weight", "scale", "expert_idx", "expert_scales", "shared")
SCALAR_SLOTS = ("eps", "weight_offset")
OUTPUT_SLOTS = ("out", "residual_out", "norm_out", "scale_out")


class Shape(enum.Enum):
    """An operand's shape, in the call's terms (``tokens``: the rows of the output)."""

    ROWS = "(tokens, hidden)"
    HIDDEN = "(hidden,)"
    EXPERT_ROWS = "(rows, hidden)"  # the permuted expert outputs: any number of rows
    ROUTES = "(tokens, top_k)"
    SCALES = "(tokens, groups)"
    PACKED_SCALES = "(tokens, ceil(groups / 4))"
    ONE = "(1,)"  # one element (any shape of one element is taken)


class DType(enum.Enum):
    """An operand's dtype: the fusion object's (``INPUT``) or a fixed one."""

    INPUT = "the input dtype"
    FP8 = "float8_e4m3fn"
    FLOAT32 = "float32"
    INT32 = "int32"
    FLOAT32_OR_INPUT = "float32 or the input dtype"


class Layout(enum.Enum):
    CONTIGUOUS = "contiguous"
    UE8M0 = "column-major, the token stride padded to a multiple of 4"


@dataclass(frozen=True)
class Operand:
    """One tensor of a call (see the module docstring). ``may_alias``: the input slot this output may be."""

    slot: str
    arg: str
    output: bool
    shape: Shape
    dtype: DType
    layout: Layout = Layout.CONTIGUOUS
    may_alias: str = ""

    def torch_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """This operand's dtype for a fusion object of ``dtype`` (FLOAT32_OR_INPUT: the fixed one, float32)."""
        return {DType.INPUT: dtype, DType.FP8: FP8_DTYPE, DType.FLOAT32: torch.float32, DType.INT32: torch.int32,
                DType.FLOAT32_OR_INPUT: torch.float32}[self.dtype]


def out_arg(spec: FusionSpec) -> str:
    """What the public ops call the ``out`` slot: ``quant_out`` (a quantization), ``norm_out`` (the norm of a call
    with a residual) or ``out``."""
    return "quant_out" if spec.quant is not Quant.NONE else "norm_out" if spec.residual else "out"


def operands(spec: FusionSpec) -> Tuple[Operand, ...]:
    """The operands of ``spec``: inputs first (``x`` first), then outputs (``out`` first)."""
    found = _OPERANDS.get(spec.code)
    if found is None:
        found = _OPERANDS[spec.code] = _derive(spec)
    return found


def inputs(spec: FusionSpec) -> Tuple[Operand, ...]:
    return tuple(o for o in operands(spec) if not o.output)


def outputs(spec: FusionSpec) -> Tuple[Operand, ...]:
    return tuple(o for o in operands(spec) if o.output)


_OPERANDS: Dict[int, Tuple[Operand, ...]] = {}  # by spec code (a dict, not lru_cache: torch.compile traces it)


def _derive(spec: FusionSpec) -> Tuple[Operand, ...]:
    found = []
    if spec.moe:
        found += [Operand("x", "expert_out", False, Shape.EXPERT_ROWS, DType.INPUT),
                  Operand("expert_idx", "permuted_idx", False, Shape.ROUTES, DType.INT32),
                  Operand("expert_scales", "expert_scales", False, Shape.ROUTES, DType.FLOAT32_OR_INPUT)]
        if spec.shared_expert:
            found.append(Operand("shared", "shared_expert_out", False, Shape.ROWS, DType.INPUT))
    else:
        found.append(Operand("x", "x", False, Shape.ROWS, DType.INPUT))
    if spec.residual:
        found.append(Operand("residual", "residual", False, Shape.ROWS, DType.INPUT))
    if spec.norm:
        found.append(Operand("weight", "weight", False, Shape.HIDDEN, DType.INPUT))
    if spec.quant is Quant.FP8_STATIC:
        found.append(Operand("scale", "scale", False, Shape.ONE, DType.FLOAT32))
    found.append(Operand("out", out_arg(spec), True, Shape.ROWS, DType.FP8 if spec.quant else DType.INPUT))
    if spec.residual:
        found.append(Operand("residual_out", "residual_out", True, Shape.ROWS, DType.INPUT, may_alias="residual"))
    if spec.also_norm:
        found.append(Operand("norm_out", "norm_out", True, Shape.ROWS, DType.INPUT))
    if spec.scale_layout is ScaleLayout.UE8M0:
        found.append(Operand("scale_out", "scale_out", True, Shape.PACKED_SCALES, DType.INT32, Layout.UE8M0))
    elif spec.scale_layout is ScaleLayout.FP32:
        found.append(Operand("scale_out", "scale_out", True, Shape.SCALES, DType.FLOAT32))
    return tuple(found)


def names(spec: FusionSpec) -> Tuple[str, ...]:
    """The output slots ``spec`` writes, ``out`` first."""
    return tuple(o.slot for o in outputs(spec))


def shape_of(operand: Operand, spec: FusionSpec, tokens: int, hidden: int) -> Tuple[int, ...]:
    """The exact shape of an output (or of a ROWS/HIDDEN input) for a call of ``tokens`` rows."""
    if operand.shape is Shape.HIDDEN:
        return (hidden,)
    if operand.shape is Shape.SCALES:
        return (tokens, spec.groups(hidden))
    if operand.shape is Shape.PACKED_SCALES:
        return (tokens, -(-spec.groups(hidden) // 4))
    return (tokens, hidden)


def packed_strides(tokens: int) -> Tuple[int, int]:
    """The strides of a packed UE8M0 scale tensor of ``tokens`` rows (:func:`arfuse.core.math.ue8m0_empty`)."""
    return (1, -(-tokens // 4) * 4)


def allocate(operand: Operand, spec: FusionSpec, tokens: int, hidden: int, dtype: torch.dtype,
             device) -> torch.Tensor:
    """A new tensor for an output ``operand`` (one ``torch.empty``; UE8M0 scales in their packed layout)."""
    if operand.layout is Layout.UE8M0:
        return ue8m0_empty(tokens, spec.groups(hidden), device)
    return torch.empty(shape_of(operand, spec, tokens, hidden), dtype=operand.torch_dtype(dtype), device=device)


def allocate_all(spec: FusionSpec, tokens: int, hidden: int, dtype: torch.dtype, device) -> Dict[str, torch.Tensor]:
    """Every output of ``spec``, new, by slot (for tools and tests that drive a backend directly)."""
    return {o.slot: allocate(o, spec, tokens, hidden, dtype, device) for o in outputs(spec)}


def op_schema(name: str, extra: Tuple[str, ...] = (), returns: bool = False) -> str:
    """The ``torch.library`` schema of an op that takes every slot of a call, so one op serves every spec: the
    inputs as tensors (optional but ``x``), :data:`SCALAR_SLOTS` as floats, then ``extra`` (``"type name"``
    each); the outputs either as mutated tensor arguments (``out`` required; the op returns nothing) or, with
    ``returns``, returned as a list (the outputs the spec writes, in :data:`OUTPUT_SLOTS` order).

    >>> op_schema("f", ("int spec",), returns=True)
    'f(Tensor x, Tensor? residual, Tensor? weight, Tensor? scale, Tensor? expert_idx, Tensor? expert_scales, \
Tensor? shared, float eps, float weight_offset, int spec) -> Tensor[]'
    """
    parts = [f"Tensor{'' if slot == 'x' else '?'} {slot}" for slot in INPUT_SLOTS]
    parts += [f"float {slot}" for slot in SCALAR_SLOTS] + list(extra)
    if returns:
        return f"{name}({', '.join(parts)}) -> Tensor[]"
    parts += [f"Tensor(o{i}!){'' if slot == 'out' else '?'} {slot}" for i, slot in enumerate(OUTPUT_SLOTS)]
    return f"{name}({', '.join(parts)}) -> ()"


def describe(operand: Operand) -> Optional[str]:
    """One line for documentation: ``arg: shape, dtype[, layout]``."""
    layout = "" if operand.layout is Layout.CONTIGUOUS else f", {operand.layout.value}"
    return f"{operand.arg}: {operand.shape.value}, {operand.dtype.value}{layout}"
