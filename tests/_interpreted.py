"""Running arfuse's Triton kernels under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU, with three
interpreter defects worked around (none is in the compiled kernels, which the GPU runs):

1. ``range(tl.program_id(0), n, tl.num_programs(0))``: the interpreter holds program ids as 1-element arrays and
   converts them with ``int(array)``, which NumPy >= 2.3 refuses; the conversion is done on the element instead.
2. ``float32 -> bfloat16`` and ``float32 -> float8e4nv``: the interpreter's bit-level conversion truncates to
   bfloat16, and for e4m3 rounds halves up without carrying a rounded-up mantissa into the exponent (125.5 becomes
   64, not 128). The GPU rounds
   to nearest even (``cvt.rn.bf16.f32``; ``cvt.rn.satfinite.e4m3x2.f32``, which also saturates); the patch converts
   through torch the same way. (float16 goes through NumPy's own conversion, which is right.)
3. Triton 3.9's interpreter hands its masked load, store and atomic an int32 mask for ``bool block & scalar
   comparison`` (e.g. ``(offs < H) & (row < n_rows)``), which they refuse ("mask has unsupported dtype"); the mask
   is passed as the booleans it stands for (Triton 3.6 gives booleans: a no-op there).

Call :func:`patch` before the first launch (in the subprocess that runs interpreted).
"""
from __future__ import annotations

import numpy as np
import torch


def patch() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor

    def patched_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched_lang_tensor

    original_convert = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in (tl.float8e4nv, tl.bfloat16):
            values = torch.from_numpy(np.ascontiguousarray(input).view(np.float32).copy())
            if output_dtype == tl.bfloat16:
                return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(np.shape(input))
            saturated = torch.where(values.isnan(), values, values.clamp(-448.0, 448.0))
            return saturated.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(np.shape(input))
        return original_convert(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    interpreter._interpreter = _BoolMasks(interpreter._interpreter)


class _BoolMasks:
    """The interpreter's native module, its masked memory operations given boolean masks (defect 3)."""

    def __init__(self, native):
        self._native = native

    def __getattr__(self, name):
        return getattr(self._native, name)

    def load(self, ptrs, mask, other, dtype):
        return self._native.load(ptrs, np.asarray(mask).astype(bool, copy=False), other, dtype)

    def store(self, ptrs, value, mask):
        return self._native.store(ptrs, value, np.asarray(mask).astype(bool, copy=False))

    def atomic_rmw(self, op, ptr, val, mask, sem):
        return self._native.atomic_rmw(op, ptr, val, np.asarray(mask).astype(bool, copy=False), sem)
