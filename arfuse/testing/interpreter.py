"""Running arfuse's Triton kernels under Triton 3.6's interpreter (``TRITON_INTERPRET=1``) on the CPU.

:func:`patch` works around three interpreter defects (none is in the compiled kernels, which the GPU runs):

1. ``range(tl.program_id(0), n, tl.num_programs(0))``: the interpreter holds program ids as 1-element arrays and
   converts them with ``int(array)``, which NumPy >= 2.3 refuses; the conversion is done on the element instead.
2. ``float32 -> bfloat16`` and ``float32 -> float8e4nv``: the interpreter's bit-level conversion truncates to
   bfloat16, and for e4m3 rounds halves up without carrying a rounded-up mantissa into the exponent (125.5 becomes
   64, not 128). The GPU rounds to nearest even (``cvt.rn.bf16.f32``; ``cvt.rn.satfinite.e4m3x2.f32``, which also
   saturates); the patch converts through torch the same way. (float16 goes through NumPy's own conversion.)
3. Triton 3.9's interpreter hands its masked load, store and atomic an int32 mask for ``bool block & scalar
   comparison`` (e.g. ``(offs < H) & (row < n_rows)``), which they refuse ("mask has unsupported dtype"); the mask
   is passed as the booleans it stands for (Triton 3.6 gives booleans: a no-op there).

:func:`install_sync_standins` gives the symmetric-memory kernels the interpreter versions of ``_sync``'s three PTX
primitives (:mod:`arfuse.testing.sync_standins`), and :func:`ranks_as_threads` lets several threads run kernels
at once (the interpreter patches ``triton.language`` around each launch and restores it at the end, which would
pull the language from under a thread still running). Call these in the process that runs interpreted, before the
first launch; the process must have been started with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import numpy as np
import torch

SYNC_PRIMITIVES = {"globaltimer": "globaltimer", "_signal": "signal", "_wait": "wait"}
KERNEL_MODULES = ("_sync", "lamport", "one_shot", "two_shot", "lamport_two_shot")


def patch() -> None:
    """Work around the interpreter defects above (idempotent enough: call once per process)."""
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
    if not isinstance(interpreter._interpreter, _BoolMasks):
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


def _tensor_range(*bounds):
    """``range`` whose values are int32 scalars, as a compiled kernel's loop variable is (the interpreter's own
    loop variables are Python ints, on which ``row.to(tl.int64)`` fails)."""
    import triton.language as tl

    for value in range(*(int(b) for b in bounds)):
        yield tl.full([], value, tl.int32)


def install_sync_standins() -> None:
    """Replace ``_sync``'s timer, flag store and flag spin by their interpreter stand-ins in every symmetric-memory
    kernel module that refers to them (the interpreter looks globals up at call time), and give those modules a
    ``range`` whose loop variables are tensors, as in the compiled kernels."""
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("install_sync_standins: only for a process started with TRITON_INTERPRET=1")
    from arfuse.testing import sync_standins

    sync = importlib.import_module("arfuse.kernels._sync")
    originals = {name: getattr(sync, name) for name in SYNC_PRIMITIVES}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"arfuse.kernels.{module_name}")
        for name, standin in SYNC_PRIMITIVES.items():
            if getattr(module, name, None) is originals[name]:
                setattr(module, name, getattr(sync_standins, standin))
        module.range = _tensor_range


class _KeptScope:
    def restore(self) -> None:
        """Nothing: the language stays patched until :func:`ranks_as_threads` ends."""


@contextlib.contextmanager
def ranks_as_threads() -> Iterator[None]:
    """Within this context, kernels may run in several threads at once: ``triton.language`` is patched once, at
    the start, and each launch's own patching and restoring is skipped (a thread re-patching while another runs
    would swap attributes under it); the context's end undoes the patch."""
    import triton.language as tl
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang
    scope = original_patch(eval("lambda: None", {"tl": tl, "core": tl.core}))  # sees both language modules
    interpreter._patch_lang = lambda fn: _KeptScope()
    try:
        yield
    finally:
        interpreter._patch_lang = original_patch
        scope.restore()
