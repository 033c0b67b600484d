"""Where the microseconds of a call go (``arfuse bench --host --profile``): the call runs under :mod:`cProfile`
and every function's own time is attributed to a part of the call (API, validation, output allocation, plan
lookup, launcher, kernel launch, ...); a builtin or a function outside arfuse counts for the part of its caller.
Profiling slows every call: its cost per call (measured on a loop of empty calls) is taken off the calling
function's own time, and :func:`scaled` gives each part's share of that total scaled to the unprofiled time
(approximate). ``plan lookup`` is the executor's own time (route lookup, fallback check, the call counted in its
slot); ``kernel launch`` is Triton's Python and arfuse's compiled-kernel launcher; ``torch ops`` is ``torch_ref``'s
own work."""
from __future__ import annotations

import cProfile
import pstats
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

PARTS = ("API", "validation", "spec lookup", "output allocation", "FusedCall build", "dispatch", "plan lookup",
         "counters", "launcher", "kernel launch", "torch ops", "collective", "op dispatch", "other")

_BY_FILE = (  # (path fragment, part), first match wins
    ("arfuse/core/validate.py", "validation"), ("arfuse/core/quant.py", "validation"),
    ("arfuse/core/prepare.py", "validation"), ("arfuse/core/operands.py", "output allocation"),
    ("arfuse/core/op_specs.py", "spec lookup"), ("arfuse/core/types.py", "FusedCall build"),
    ("arfuse/core/counters.py", "counters"), ("arfuse/core/spec.py", "spec lookup"),
    ("arfuse/runtime/executor.py", "plan lookup"), ("arfuse/runtime/custom_op.py", "dispatch"),
    ("arfuse/kernels/_launch.py", "kernel launch"),
    ("arfuse/core/math.py", "torch ops"), ("arfuse/backends/torch_ref.py", "torch ops"),
    ("arfuse/backends/", "launcher"), ("arfuse/kernels/", "launcher"),
    ("arfuse/api.py", "API"), ("arfuse/module.py", "API"), ("arfuse/functional.py", "API"),
    ("arfuse/fusions.py", "API"),
    ("arfuse/probe/", "API"), ("arfuse/bench/", "other"),
    ("/triton/", "kernel launch"), ("__triton_launcher", "kernel launch"),
    ("torch/distributed/", "collective"), ("torch/_library/", "op dispatch"), ("torch/_ops.py", "op dispatch"),
)
_BY_NAME = (("torch.empty", "output allocation"), ("torch.full", "output allocation"),
            ("empty_like", "output allocation"), ("new_empty", "output allocation"),
            ("of 'torch._C._distributed", "collective"), ("launch", "kernel launch"))
_BY_FUNCTION = {"_allocate": "output allocation", "allocate": "output allocation",
                "allocate_all": "output allocation", "ue8m0_empty": "output allocation"}


def _own_part(func: Tuple[str, int, str]) -> Optional[str]:
    filename, _, name = func
    path = filename.replace("\\", "/")
    if filename == "~":  # a builtin: a few are parts of their own, the rest count for their caller
        for fragment, part in _BY_NAME:
            if fragment in name and not (fragment == "launch" and "launch" not in name.split()[-1]):
                return part
        return None
    if "/arfuse/" in path and name in _BY_FUNCTION:
        return _BY_FUNCTION[name]
    for fragment, part in _BY_FILE:
        if fragment in path:
            return part
    return None


def attribute(stats: pstats.Stats, overhead_s: float = 0.0) -> Dict[str, float]:
    """Seconds of own time per part (see :data:`PARTS`): a function without a part of its own counts for its
    callers', in proportion to the time each caller spent in it. ``overhead_s``: what the profiler adds per call
    (:func:`profiler_overhead`), taken off the own time of the function making the call."""
    made: Dict[tuple, int] = {}
    for _, (_, _, _, _, callers) in stats.stats.items():
        for caller, v in callers.items():
            made[caller] = made.get(caller, 0) + v[1]
    table = {f: (cc, nc, max(0.0, tt - made.get(f, 0) * overhead_s), ct, callers)
             for f, (cc, nc, tt, ct, callers) in stats.stats.items()}  # func -> (cc, nc, tt, ct, callers)
    memo: Dict[tuple, Dict[str, float]] = {}

    def shares(func, seen) -> Dict[str, float]:
        """Fractions of ``func``'s time per part."""
        if func in memo:
            return memo[func]
        own = _own_part(func)
        if own is not None:
            memo[func] = {own: 1.0}
            return memo[func]
        callers = table.get(func, (0, 0, 0, 0, {}))[4]
        total = sum(v[2] for v in callers.values())
        found: Dict[str, float] = {}
        if not callers or total <= 0 or func in seen:
            found = {"other": 1.0}
        else:
            for caller, v in callers.items():
                for part, f in shares(caller, seen | {func}).items():
                    found[part] = found.get(part, 0.0) + f * v[2] / total
        memo[func] = found
        return found

    result = {p: 0.0 for p in PARTS}
    for func, (_, _, tt, _, callers) in table.items():
        if _own_part(func) is None and callers:  # split by caller, each caller's part
            total = sum(v[2] for v in callers.values()) or 1.0
            for caller, v in callers.items():
                for part, f in shares(caller, frozenset({func})).items():
                    result[part] = result.get(part, 0.0) + tt * (v[2] / total) * f
        else:
            for part, f in shares(func, frozenset()).items():
                result[part] = result.get(part, 0.0) + tt * f
    return result


_OVERHEAD: List[float] = []


def profiler_overhead() -> float:
    """Seconds cProfile adds to a run per profiled call (measured once per process: a loop calling an empty
    function, profiled and not)."""
    if not _OVERHEAD:
        def empty():
            return None

        def loop(n):
            for _ in range(n):
                empty()

        n = 50_000
        t0 = time.perf_counter()
        loop(n)
        plain = time.perf_counter() - t0
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        loop(n)
        prof.disable()
        profiled = time.perf_counter() - t0
        _OVERHEAD.append(max(0.0, (profiled - plain) / n))
    return _OVERHEAD[0]


def profile_call(fn: Callable, calls: int, device: torch.device) -> Dict[str, float]:
    """µs per call per part of ``fn`` under cProfile, the profiler's own cost per call taken off (roughly: see
    :func:`scaled`)."""
    overhead = profiler_overhead()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    if device.type == "cuda":
        torch.cuda.synchronize()
    parts = attribute(pstats.Stats(prof), overhead)
    return {p: s * 1e6 / calls for p, s in parts.items() if s > 0}


def scaled(parts: Dict[str, float], measured_us: float) -> Dict[str, float]:
    """Each part's share of the (deflated) profiled total, times the unprofiled µs per call."""
    total = sum(parts.values()) or 1.0
    return {p: measured_us * v / total for p, v in parts.items()}
