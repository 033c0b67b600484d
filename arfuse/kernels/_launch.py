"""Kernel launches with less host work than Triton's ``kernel[grid](...)``.

Triton 3.6's ``JITFunction.run`` does, on every launch: bind every argument, derive its specialization (type and
16-byte divisibility of each argument), build and hash the cache key, check the kernel's globals, build launch
metadata and call the (empty) launch hooks from the launcher - several µs of Python before the kernel's own
compiled launcher runs (``arfuse bench --host`` measures it). A :class:`Launcher` sends the first launch of each
*key* through ``kernel[grid](...)``, which compiles when needed, launches and returns the compiled kernel; later
launches with that key call the compiled kernel's launcher directly, with the arguments ``JITFunction.run`` would
pass it (every parameter in order, constexprs included, no launch metadata while no launch hook is set).

The key is built cheaply from what decides Triton's specialization of the arguments (:class:`ArgKey`: each
pointer's dtype and 16-byte alignment, the values of the ints Triton specializes, whether the others fit in
int32), the constexprs and the launch options; ``tests/unit/test_fast_launch.py`` checks every kernel's key
against Triton's own binder (launches that share a key share Triton's specialization). Launches go through
``kernel[grid](...)`` instead whenever the fast path cannot be sure to launch what Triton would:

- the key has no compiled kernel yet;
- the module's kernel is not the one the compiled kernel came from (a test or tool replaced it);
- a launch hook or pre-run hook is set (a profiler wants to see the launch); the current CUDA device and
  ``TRITON_DEBUG`` / the instrumentation mode (which change Triton's options) are part of the key;
- the compiled kernel Triton returned does not have a launcher of the shape this module calls (another Triton);
- ``ARFUSE_FAST_LAUNCH=0``.

Thread-safe (a cache miss in two threads only compiles or inserts twice). Graph-capturable: both paths launch on
the current stream.

Inside :func:`compile_only`, a launch compiles its kernel (Triton's ``warmup``, with the same arguments, so the same
specialization) and remembers it, but runs nothing: ranks that share one process compile every rank's kernel this
way before any of them launches, so none waits on a peer that is still compiling.
"""
from __future__ import annotations

import contextlib
import operator
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
    from triton.runtime.driver import driver as _driver
except ImportError:  # another Triton: every launch takes kernel[grid]
    _knobs = _HookChain = _driver = None

ENABLED = _knobs is not None and not _knobs.runtime.interpret and os.environ.get(
    "ARFUSE_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")
# The symmetric-memory kernels' specialized int parameters: peer and signal-pad addresses, host-mapped records,
# the timeout and the region offsets and strides (fixed for a workspace, so keyed by value).
SYMM_INTS = (tuple(f"P{i}" for i in range(8)) + tuple(f"S{i}" for i in range(8))
             + ("err_ptr", "guard_ptr", "timeout_ns", "region_off", "slot_stride", "buffer_stride", "half_stride",
                "rs_off", "rs_slot", "rs_buffer", "gather_off", "gather_buffer"))
FLOATS = ("eps", "weight_offset")  # the kernels' float parameters (do_not_specialize: always fp32)
MAX_ENTRIES = 512  # per kernel; keys are few (spec codes x dtypes x launch shapes), this only bounds a pathology
I32 = 1 << 31


def tensor_facts(*tensors) -> tuple:
    """The dtype (None for None) of each argument, then a bit mask of those whose ``data_ptr()`` is not 16-byte
    aligned: what Triton specializes a pointer argument on."""
    found = []
    misaligned, bit = 0, 1
    for t in tensors:
        if t is None:
            found.append(None)
        else:
            found.append(t.dtype)
            if t.data_ptr() & 15:
                misaligned |= bit
        bit <<= 1
    found.append(misaligned)
    return tuple(found)


def _getter(indices: Tuple[int, ...]) -> Callable[[tuple], tuple]:
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices)


class ArgKey:
    """The key of a kernel's positional arguments (see the module docstring): ``tensors`` - the positions of its
    pointer parameters (a tensor or None: :func:`tensor_facts`); ``fixed`` - its int parameters Triton
    specializes (values equal to 1 or divisible by 16), keyed by their values (pointers and offsets fixed for a
    workspace); ``runtime`` - its ``do_not_specialize`` ints, keyed on fitting in int32. Every other positional
    argument must be a ``do_not_specialize`` float (always fp32 to Triton). ``tests/unit/test_fast_launch.py``
    checks each kernel's lists against its parameters."""

    __slots__ = ("tensors", "fixed", "runtime", "positions")

    def __init__(self, tensors: Tuple[int, ...], fixed: Tuple[int, ...] = (), runtime: Tuple[int, ...] = ()):
        self.positions = (tuple(tensors), tuple(fixed), tuple(runtime))
        self.tensors, self.fixed, self.runtime = _getter(tensors), _getter(fixed), _getter(runtime)

    @classmethod
    def of(cls, kernel, ints: Tuple[str, ...] = (), floats: Tuple[str, ...] = FLOATS) -> Optional["ArgKey"]:
        """The key of ``kernel``'s parameters: ``ints`` names the specialized ones the launcher passes ints to
        (addresses, offsets), ``floats`` the ``do_not_specialize`` ones it passes floats to; the other
        ``do_not_specialize`` ones take ints, every other non-constexpr one a tensor or None. None for a kernel
        without Triton's parameter list (Triton's interpreter): its launches all go through ``kernel[grid]``."""
        if not hasattr(kernel, "params"):
            return None
        tensors, fixed, runtime = [], [], []
        for i, p in enumerate(kernel.params):
            if p.is_constexpr or p.name in floats:
                continue
            if p.do_not_specialize:
                runtime.append(i)
            elif p.name in ints:
                fixed.append(i)
            else:
                tensors.append(i)
        return cls(tuple(tensors), tuple(fixed), tuple(runtime))

    def __call__(self, args: tuple) -> tuple:
        runtime = self.runtime(args)
        fits = not runtime or (-I32 <= min(runtime) and max(runtime) < I32)
        return tensor_facts(*self.tensors(args)), self.fixed(args), fits


def _hook_idle(hook) -> bool:
    return hook is None or (type(hook) is _HookChain and not hook.calls)


class _Entry:
    __slots__ = ("kernel", "compiled", "run", "function", "metadata")

    def __init__(self, kernel, compiled):
        self.kernel, self.compiled = kernel, compiled
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata


LAUNCHERS: list = []  # every Launcher made (one per kernel), for clear_all
_MODE = threading.local()


@contextlib.contextmanager
def compile_only():
    """Within this context (in this thread), every :meth:`Launcher.launch` compiles its kernel for the given
    arguments and returns without launching it."""
    before = getattr(_MODE, "compile_only", False)
    _MODE.compile_only = True
    try:
        yield
    finally:
        _MODE.compile_only = before


def clear_all() -> None:
    """Forget every launcher's compiled kernels (the next launch of each key goes through ``kernel[grid]``)."""
    for launcher in LAUNCHERS:
        launcher.clear()


class Launcher:
    """Launches of one ``@triton.jit`` kernel, looked up by name in its module on every launch (so a replaced
    kernel is honoured), through the compiled kernel where it can (see the module docstring). ``key``: the
    :class:`ArgKey` of the kernel's positional arguments."""

    __slots__ = ("module", "name", "key", "entries")

    def __init__(self, module: Any, name: str, key: Optional[ArgKey]):
        self.module, self.name, self.key = module, name, key
        self.entries: Dict[Any, _Entry] = {}
        LAUNCHERS.append(self)

    def launch(self, grid: int, args: tuple, consts: Dict[str, Any], options: Dict[str, Any]) -> None:
        """``kernel[(grid,)](*args, **consts, **options)``; ``consts``: the constexpr parameters after ``args``,
        in the kernel's order; ``options``: ``num_warps`` and the like."""
        kernel = getattr(self.module, self.name)
        compiling = getattr(_MODE, "compile_only", False)
        key = None
        if ENABLED and self.key is not None:
            try:
                drv = _driver.active
                rt = _knobs.runtime
                values = tuple(consts.values())
                key = (drv.get_current_device(), rt.debug, _knobs.compilation.instrumentation_mode, self.key(args),
                       values, tuple(options.values()))
            except (AttributeError, TypeError, IndexError, RuntimeError):
                key = None  # an argument of another kind than the key expects, or no active Triton driver
            else:
                entry = self.entries.get(key)
                if entry is not None and entry.kernel is kernel and _hook_idle(rt.launch_enter_hook) \
                        and _hook_idle(rt.launch_exit_hook) and not kernel.pre_run_hooks:
                    if compiling:
                        return
                    entry.run(grid, 1, 1, drv.get_current_stream(key[0]), entry.function, entry.metadata, None, None,
                              None, *args, *values)
                    return
        if compiling:
            compiled = kernel.warmup(*args, grid=(grid,), **consts, **options)
        else:
            compiled = kernel[(grid,)](*args, **consts, **options)
        if key is not None and compiled is not None:
            self._remember(key, kernel, compiled, len(args), consts)

    def _remember(self, key, kernel, compiled, n_args: int, consts: Dict[str, Any]) -> None:
        names = getattr(kernel, "arg_names", None)
        if names is None or list(names[n_args:]) != list(consts) or getattr(kernel, "debug", None):
            return  # not a JITFunction, or the constexprs do not close the argument list in order
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return  # a compiled kernel of another shape (or a stand-in that launches nothing)
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = _Entry(kernel, compiled)

    def clear(self) -> None:
        self.entries.clear()


def full_arguments(kernel, args: tuple, consts: Dict[str, Any]) -> Tuple[Any, ...]:
    """Every parameter's value in the kernel's order, as ``JITFunction.run`` passes them to the launcher."""
    return tuple(args) + tuple(consts[name] for name in kernel.arg_names[len(args):])
