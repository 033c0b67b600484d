"""Triton on the CPU as on a GPU up to the compiled kernel's launch, for timing arfuse's launch paths without a GPU:
a stand-in active driver (device 0, stream 0, an sm_90 target) and each arfuse kernel's compile replaced by a
stand-in compiled kernel whose launcher launches nothing (:func:`triton_stubbed`); and :func:`recorded_launches`,
which records the ``kernel[grid](*args, **kwargs)`` launches a function makes, launching none."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

KERNEL_MODULES = ("nccl_epilogue", "lamport", "one_shot", "two_shot", "lamport_two_shot")


class _StubLauncher:
    """What Triton 3.6's compiled-kernel launcher does in Python (``CudaLauncher.__call__``: the scratch
    allocations, then from C the launch hooks), launching nothing (no argument parsing, no ``cuLaunchKernelEx``)."""

    def __call__(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *args):
        def allocate_scratch(size, align, allocator):
            if size > 0:
                return allocator(grid_x * grid_y * grid_z * size, align, stream)
            return None

        allocate_scratch(0, 1, None)
        allocate_scratch(0, 1, None)
        if enter is not None:
            enter(launch_metadata)
        if exit_ is not None:
            exit_(launch_metadata)


class _StubCompiled:
    """A compiled kernel whose launcher launches nothing; ``launch_metadata`` as ``CompiledKernel``'s."""

    def __init__(self, name: str):
        self.name, self.function, self.packed_metadata, self.run = name, 0, (), _StubLauncher()

    def launch_metadata(self, grid, stream, *args):
        from triton import knobs
        from triton.compiler.compiler import LazyDict

        if knobs.runtime.launch_enter_hook is None:
            return None
        return LazyDict({"name": self.name, "function": self.function, "stream": stream})


class _StubDriver:
    """Triton's active driver without a GPU: device 0, stream 0, an sm_90 target."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _jit_kernels() -> list:
    import importlib

    from triton.runtime.jit import JITFunction

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"arfuse.kernels.{name}")
        found += [k for attr, k in vars(module).items() if attr.endswith("_kernel") and isinstance(k, JITFunction)]
    return found


@contextlib.contextmanager
def triton_stubbed() -> Iterator[None]:
    """Triton on the CPU as on a GPU up to the compiled kernel's launch: a stand-in active driver and each arfuse
    kernel's compile replaced by a stand-in compiled kernel (:class:`_StubCompiled`), so ``JITFunction.run`` and
    arfuse's launchers run their real Python and nothing is launched. Everything is restored on exit (and every
    launcher's compiled kernels forgotten, before and after)."""
    from collections import defaultdict

    from triton.runtime.driver import driver

    try:
        from arfuse.kernels._launch import clear_all
    except ImportError:  # an arfuse without the fast launcher
        def clear_all():
            return None

    kernels = _jit_kernels()
    saved = [(k, k.device_caches, k.__dict__.get("compile")) for k in kernels]
    previous = driver._active
    clear_all()
    driver.set_active(_StubDriver())
    try:
        for k in kernels:
            def stub_compile(src, target=None, options=None, _name=k.fn.__name__, **kw):
                return _StubCompiled(_name)

            def binder(k=k, original=k.create_binder, stub_compile=stub_compile):
                made = original()  # (sets k.compile to Triton's compile: set the stand-in after it)
                k.compile = stub_compile
                return made

            k.device_caches = defaultdict(binder)
        yield
    finally:
        driver._active = previous
        for k, caches, compile_fn in saved:
            k.device_caches = caches
            if compile_fn is None:
                k.__dict__.pop("compile", None)
            else:
                k.compile = compile_fn
        clear_all()


class _Recorder:
    """Stands in for a kernel for one call: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, launches: list, kernel):
        self.launches, self.kernel = launches, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


def recorded_launches(fn: Callable[[], object]) -> list:
    """``(kernel, grid, args, kwargs)`` of every arfuse kernel launch ``fn()`` makes (launching none)."""
    import importlib
    import unittest.mock as mock

    launches: list = []
    patches = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"arfuse.kernels.{name}")
        for attr, k in list(vars(module).items()):
            if attr.endswith("_kernel") and hasattr(k, "arg_names"):
                patches.append(mock.patch.object(module, attr, _Recorder(launches, k)))
    for p in patches:
        p.start()
    try:
        fn()
    finally:
        for p in reversed(patches):
            p.stop()
    return launches
