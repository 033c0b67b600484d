"""A :class:`~arfuse.core.spec.FusionSpec` as the kernels see it: one ``EPI: tl.constexpr`` (the spec's ``code``)
decoded at compile time, so every spec compiles to a kernel holding only its own branches.

The bit layout is ``arfuse.core.spec.CODE_FIELDS``; nothing here repeats it. In a kernel, ``field(EPI, "quant")``
is a compile-time int (compare enum fields with the ``QUANT_*`` / ``LAYOUT_*`` constants), so ``if`` on it is static.
"""
import triton
import triton.language as tl

from arfuse.core.math import GROUP_MIN_SCALE, PER_TOKEN_MIN_SCALE
from arfuse.core.spec import CODE_FIELDS, Prologue, Quant, ScaleLayout
from arfuse.core.types import FP8_MAX as _FP8_MAX

_LAYOUT = {name: (shift, width) for name, shift, width in CODE_FIELDS}

QUANT_NONE = tl.constexpr(int(Quant.NONE))
QUANT_STATIC = tl.constexpr(int(Quant.FP8_STATIC))
QUANT_PER_TOKEN = tl.constexpr(int(Quant.FP8_PER_TOKEN))
QUANT_GROUP = tl.constexpr(int(Quant.FP8_PER_TOKEN_GROUP))
LAYOUT_FP32 = tl.constexpr(int(ScaleLayout.FP32))
LAYOUT_UE8M0 = tl.constexpr(int(ScaleLayout.UE8M0))
PROLOGUE_MOE = tl.constexpr(int(Prologue.MOE_FINALIZE))

FP8_MAX = tl.constexpr(_FP8_MAX)
PER_TOKEN_FLOOR = tl.constexpr(PER_TOKEN_MIN_SCALE)
GROUP_FLOOR = tl.constexpr(GROUP_MIN_SCALE)


@triton.constexpr_function
def field(code, name):
    """The value of field ``name`` in a spec code, at compile time."""
    shift, width = _LAYOUT[name]
    return (code >> shift) & ((1 << width) - 1)

