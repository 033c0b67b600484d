"""``arfuse bench --host``: what one eager call costs the host, per public op and spec kind, per backend that runs
here, next to the bare work of the same backend and the unfused torch a user would write.

Method: ``calls`` back-to-back calls with the same inputs, timed with ``perf_counter_ns`` around the Python loop
(on CUDA the stream runs ahead and is synchronised only after the loop, outside the timed part, so the figure is
the host's time per call, not the kernels'; the calls are small enough that the GPU is idle most of the loop). The
variants of a case (arfuse, bare, unfused) are timed in turn in each of ``samples`` rounds, so drift on a shared
host hits them alike; a figure is the median over the rounds, ``overhead`` the median of the per-round differences
arfuse - bare. World sizes above 1 take the slowest rank.

``bare`` is what the backend itself does with every argument prepared: ``torch_ref``'s torch calls
(``Backend.run`` on a prebuilt call), the ``nccl`` path's kernel launches through Triton's ``kernel[grid](...)``
with prebuilt arguments (``bare_direct``: the same compiled kernels launched straight through their launcher, the
floor any Python caller has). ``unfused`` is clone + ``dist.all_reduce`` + the torch ops of an HF-style RMSNorm
(and quantization). The targets (issue 14): arfuse at most 1.7x the bare launch on GPUs, at most 10 µs over
``torch_ref``'s own torch calls on CPU.

``--profile`` runs each case under :mod:`cProfile` and attributes every function's own time to a part of the
call (validation, plan lookup, output allocation, FusedCall build, counters, launcher, kernel launch, ...): a
builtin or a function outside arfuse counts for the part of its caller. Profiling slows every call: its cost per
call (measured on a loop of empty calls) is taken off the calling function's own time, and the table gives each
part's share of that total scaled to the unprofiled time (``profile_us`` in the JSON: the deflated µs as
profiled; approximate). ``plan lookup`` is the executor's own time (route lookup, fallback check, the call counted
in its slot); ``kernel launch`` is Triton's Python and arfuse's compiled-kernel launcher; ``torch ops`` is
``torch_ref``'s own work.

:func:`stubbed_launchers` times the ``nccl``, ``triton_symm`` and ``flashinfer`` launch paths on the CPU with the
kernel call stubbed (no GPU needed, nothing launched; :func:`triton_stubbed`): the host work from ``Backend.run``
to the compiled kernel's launcher, next to the same launches through ``kernel[grid]`` - the first way to time the
last two, which cannot be constructed on one GPU.

CPU timings on a shared host are indicative (the rounds' spread is in the JSON); at world size 2 on a few cores
gloo's own latency and the ranks' scheduling dominate, so compare overheads at world size 1.
"""
from __future__ import annotations

import contextlib
import cProfile
import pstats
import statistics
import time
import types
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

import arfuse
from arfuse import functional as F
from arfuse.backends import base
from arfuse.core import math as fmath, operands
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout
from arfuse.core.types import FP8_DTYPE, FP8_MAX, FusedCall
from arfuse.probe import vote

FORMAT = "arfuse-host-bench"
VERSION = 1
GPU_TARGET_RATIO = 1.7  # arfuse / bare kernel launch
CPU_TARGET_US = 10.0  # arfuse - torch_ref's own torch calls
STUB_NOTE = ("CPU-side timing, kernel call stubbed (not constructible on one GPU): Backend.run through arfuse's "
             "launcher and Triton's Python up to the compiled kernel's launcher, which launches nothing; a GPU adds "
             "that launcher's argument parsing and cuLaunchKernelEx (bare_direct on the nccl rows of a GPU run)")


@dataclass(frozen=True)
class HostConfig:
    hidden: int = 256
    tokens: int = 8
    dtype: str = "bfloat16"
    calls: int = 200  # back-to-back calls per timed sample
    samples: int = 10  # rounds; the median is the figure
    warmup: int = 20
    top_k: int = 2
    group_size: int = 128
    backends: Tuple[str, ...] = ()  # () = every registered backend that runs here
    cases: Tuple[str, ...] = ()  # () = all
    profile: bool = False
    stubbed: bool = True


# -- inputs and the cases ------------------------------------------------------------------------------------------
class Inputs:
    """One rank's tensors for every case (reused by every call: host cost does not depend on the values)."""

    def __init__(self, cfg: HostConfig, device: torch.device, rank: int = 0):
        g = torch.Generator().manual_seed(1234 + rank)
        dtype = getattr(torch, cfg.dtype)
        n, h = cfg.tokens, cfg.hidden

        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        self.x, self.residual = rand(n, h), rand(n, h)
        self.weight = (1.0 + 0.1 * torch.randn(h, generator=g)).to(device=device, dtype=dtype)
        self.rows = n * cfg.top_k
        self.expert_out = rand(self.rows, h)
        self.idx = torch.randperm(self.rows, generator=g).reshape(n, cfg.top_k).to(device=device, dtype=torch.int32)
        self.escales = torch.rand(n, cfg.top_k, generator=g).to(device=device, dtype=torch.float32)
        self.scale = 0.05
        self.scale_t = torch.full((1,), self.scale, dtype=torch.float32, device=device)
        self.eps = 1e-6
        self.dtype, self.device = dtype, device


@dataclass(frozen=True)
class Case:
    """One public call to time: ``name`` (the op and its form), the spec it runs, and how to make it."""

    name: str
    spec: FusionSpec
    form: str = "object"  # object / module / functional / op
    quant: object = None  # the quant= argument of residual_rmsnorm_quant
    inplace: bool = False
    caller_outputs: bool = False


def _group(cfg: HostConfig, packed: bool):
    return arfuse.FP8PerTokenGroup(cfg.group_size, packed_ue8m0=packed)


def cases(cfg: HostConfig) -> List[Case]:
    """Every public op, spec kind and form timed (see the module docstring)."""
    g = cfg.group_size
    group = dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=g)
    found = [
        Case("residual_rmsnorm", FusionSpec()),
        Case("residual_rmsnorm out=", FusionSpec(), caller_outputs=True),
        Case("residual_rmsnorm inplace", FusionSpec(), inplace=True),
        Case("rmsnorm", FusionSpec(residual=False)),
        Case("all_reduce", FusionSpec(residual=False, norm=False)),
        Case("residual_rmsnorm_fp8", FusionSpec(quant=Quant.FP8_STATIC)),
        Case("residual_rmsnorm_quant per-token", FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
             quant=arfuse.FP8PerToken()),
        Case(f"residual_rmsnorm_quant group{g}", FusionSpec(scale_layout=ScaleLayout.FP32, **group),
             quant=_group(cfg, False)),
        Case(f"residual_rmsnorm_quant group{g} ue8m0", FusionSpec(scale_layout=ScaleLayout.UE8M0, **group),
             quant=_group(cfg, True)),
        Case("moe_finalize_residual_rmsnorm", FusionSpec(prologue=Prologue.MOE_FINALIZE)),
        Case("FusedAddRMSNorm.forward", FusionSpec(), form="module"),
        Case("functional.residual_rmsnorm", FusionSpec(), form="functional"),
        Case("functional.rmsnorm", FusionSpec(residual=False), form="functional"),
        Case("functional.all_reduce", FusionSpec(residual=False, norm=False), form="functional"),
        Case("torch.ops.arfuse.fused_ (traced path)", FusionSpec(), form="op"),
    ]
    if cfg.hidden % g:
        found = [c for c in found if not c.spec.group_size]
    if cfg.cases:
        found = [c for c in found if any(sel in c.name for sel in cfg.cases)]
    return found


def arfuse_call(case: Case, fusion, inp: Inputs, group, backend: str) -> Callable[[], object]:
    """The public call of ``case`` (what a user writes), as a no-argument function."""
    x, res, w, eps, spec = inp.x, inp.residual, inp.weight, inp.eps, case.spec
    if case.form == "functional":
        if not spec.norm:
            return lambda: F.all_reduce(x, group=group, backend=backend)
        if not spec.residual:
            return lambda: F.rmsnorm(x, w, eps, group=group, backend=backend)
        return lambda: F.residual_rmsnorm(x, res, w, eps, group=group, backend=backend)
    if case.form == "module":
        module = arfuse.FusedAddRMSNorm(x.shape[1], eps, fusion=fusion)
        with torch.no_grad():
            module.weight.copy_(w)
        module.weight.requires_grad_(False)  # inference: no autograd graph around the call
        return lambda: module(x, res)
    if case.form == "op":
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        op = torch.ops.arfuse.fused_
        handle = fusion._handle  # the integer the traced graph carries
        return lambda: op(x, res, w, None, None, None, None, eps, 0.0, handle, spec.code, out, res_out, None, None)
    if spec.moe:
        return lambda: fusion.moe_finalize_residual_rmsnorm(inp.expert_out, inp.idx, inp.escales, res, w, eps)
    if not spec.norm:
        return lambda: fusion.all_reduce(x)
    if not spec.residual:
        return lambda: fusion.rmsnorm(x, w, eps)
    if spec.quant is Quant.FP8_STATIC:
        return lambda: fusion.residual_rmsnorm_fp8(x, res, w, inp.scale, eps)
    if spec.quant is not Quant.NONE:
        return lambda: fusion.residual_rmsnorm_quant(x, res, w, eps, quant=case.quant)
    if case.inplace:
        own = res.clone()  # updated by every call: not the residual the other cases read
        return lambda: fusion.residual_rmsnorm(x, own, w, eps, inplace=True)
    if case.caller_outputs:
        norm_out, res_out = torch.empty_like(x), torch.empty_like(x)
        return lambda: fusion.residual_rmsnorm(x, res, w, eps, norm_out=norm_out, residual_out=res_out)
    return lambda: fusion.residual_rmsnorm(x, res, w, eps)


def prepared_call(case: Case, inp: Inputs) -> FusedCall:
    """The validated call arfuse's checks build for ``case``, with its outputs allocated once."""
    spec, n, h = case.spec, inp.x.shape[0], inp.x.shape[1]
    made = operands.allocate_all(spec, n, h, inp.dtype, inp.device)
    moe = dict(expert_idx=inp.idx, expert_scales=inp.escales) if spec.moe else {}
    x = inp.expert_out if spec.moe else inp.x
    residual = (inp.residual.clone() if case.inplace else inp.residual) if spec.residual else None
    return FusedCall(x, made["out"], residual=residual,
                     weight=inp.weight if spec.norm else None, eps=inp.eps,
                     scale=inp.scale_t if spec.quant is Quant.FP8_STATIC else None,
                     residual_out=residual if case.inplace else made.get("residual_out"),
                     norm_out=made.get("norm_out"), scale_out=made.get("scale_out"), **moe)


def unfused_call(case: Case, inp: Inputs, group, world: int) -> Callable[[], object]:
    """The torch a user writes without arfuse: clone + ``dist.all_reduce`` + an HF-style RMSNorm (weight times
    the normed input rounded to its dtype) and, for the FP8 kinds, the quantization."""
    spec, x, res, w, eps, dtype = case.spec, inp.x, inp.residual, inp.weight, inp.eps, inp.dtype

    def reduce(t):
        s = t.clone()
        if world > 1:
            dist.all_reduce(s, group=group)
        return s

    def moe_input():
        return (inp.expert_out[inp.idx.long()].float() * inp.escales.unsqueeze(-1)).sum(dim=1).to(dtype)

    def norm(s):
        h = s.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)

    def quantize(y):
        if spec.quant is Quant.FP8_STATIC:
            return (y.float() / inp.scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        if spec.quant is Quant.FP8_PER_TOKEN:
            scales = (y.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(fmath.PER_TOKEN_MIN_SCALE)
            return (y.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales
        scales = fmath.dynamic_scales(spec, y)
        q = (y.float() / fmath.expand_scales(scales, y.shape[1])).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, (fmath.pack_ue8m0(scales) if spec.scale_layout is ScaleLayout.UE8M0 else scales)

    def run():
        s = reduce(moe_input() if spec.moe else x)
        if not spec.norm:
            return s
        if spec.residual:
            s = s + res
        y = norm(s)
        return quantize(y) if spec.quant is not Quant.NONE else y

    return run


def bare_calls(case: Case, backend_name: str, fusion, inp: Inputs, group) -> Tuple[Dict[str, Callable], list]:
    """What the backend itself does for ``case`` with every argument prepared (see the module docstring), and
    the workspaces made for it (to close)."""
    backend = base.get(backend_name)
    ws = backend.prepare(fusion.capacity, fusion.caps, group)
    call = prepared_call(case, inp)
    spec = case.spec
    found = {"bare": lambda: backend.run(ws, "default", spec, call)}
    if backend_name == "nccl" and fusion.caps.world_size == 1:
        found = nccl_bare_launches(spec, call, ws)
    return found, [ws]


def nccl_bare_launches(spec: FusionSpec, call: FusedCall, ws) -> Dict[str, Callable]:
    """The ``nccl`` path's launches at world size 1 for ``call``, arguments prebuilt: through Triton's
    ``kernel[grid](...)`` (``bare``) and straight through the compiled kernels' launchers (``bare_direct``)."""
    from arfuse.kernels import launch_config as lc, nccl_launch as nl
    from arfuse.kernels import nccl_epilogue as ne

    x, n, hidden = call.x, call.num_tokens, call.x.shape[1]
    launches = []
    if not spec.norm:
        out = call.out
        return {"bare": lambda: out.copy_(x)}
    summed = x
    if spec.moe:
        summed = call.out if call.out.dtype == x.dtype else ws.scratch[:n]
        moe = nl.moe_launch(hidden, n, summed.dtype, summed.get_device())
        launches.append((ne.moe_finalize_kernel, nl.moe_grid(n, hidden, moe),
                         (x, *lc.prologue_args(call, ws.index_guard.ptr), summed, n),
                         dict(H=hidden, BLOCK_H=moe.block_h, SLOTS=moe.slots, EPI=spec.code,
                              num_warps=moe.num_warps)))
    launch = nl.epilogue_launch(hidden, n, summed.dtype, summed.get_device())
    launches.append((ne.rmsnorm_epilogue_kernel, nl.epilogue_grid(n, launch),
                     (summed, *lc.epilogue_args(call, spec), n),
                     dict(H=hidden, BLOCK_H=launch.block_h, ROWS=launch.rows, EVICT_FIRST=launch.evict_first,
                          EPI=spec.code, num_warps=launch.num_warps)))

    def bare():
        for kernel, grid, args, kwargs in launches:
            kernel[(grid,)](*args, **kwargs)

    direct = []
    for kernel, grid, args, kwargs in launches:
        compiled = kernel[(grid,)](*args, **kwargs)
        full = tuple(args) + tuple(kwargs[name] for name in kernel.arg_names[len(args):])
        direct.append((compiled.run, grid, compiled.function, compiled.packed_metadata, full))
    device = x.device.index
    stream_of = torch._C._cuda_getCurrentRawStream

    def bare_direct():
        stream = stream_of(device)
        for run, grid, function, meta, full in direct:
            run(grid, 1, 1, stream, function, meta, None, None, None, *full)

    return {"bare": bare, "bare_direct": bare_direct}


# -- timing --------------------------------------------------------------------------------------------------------
def _barrier(group, world: int) -> None:
    if world > 1:
        dist.barrier(group=group)


def time_rounds(fns: Dict[str, Callable], cfg: HostConfig, device: torch.device, group, world: int
                ) -> Dict[str, List[float]]:
    """µs per call of each function, one sample per round (see the module docstring). Collective."""
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(cfg.warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(cfg.samples):
        for name, fn in fns.items():
            _barrier(group, world)
            t0 = time.perf_counter_ns()
            for _ in range(cfg.calls):
                fn()
            t1 = time.perf_counter_ns()
            if cuda:
                torch.cuda.synchronize()  # outside the timed part: the stream ran ahead of the host
            samples[name].append((t1 - t0) / cfg.calls / 1e3)
    return samples


def summarize(samples: Dict[str, List[float]], reference: str = "bare") -> Dict[str, dict]:
    out = {}
    for name, values in samples.items():
        entry = {"us": statistics.median(values), "min_us": min(values),
                 "q1_q3": list(_quartiles(values))}
        if reference in samples and name != reference:
            entry[f"over_{reference}_us"] = statistics.median(a - b for a, b in zip(values, samples[reference]))
        out[name] = entry
    return out


def _quartiles(values: List[float]) -> Tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# -- the profile ---------------------------------------------------------------------------------------------------
PARTS = ("API", "validation", "spec lookup", "output allocation", "FusedCall build", "dispatch", "plan lookup",
         "counters", "launcher", "kernel launch", "torch ops", "collective", "op dispatch", "other")

_BY_FILE = (  # (path fragment, part), first match wins
    ("arfuse/core/validate.py", "validation"), ("arfuse/core/quant.py", "validation"),
    ("arfuse/core/fast.py", "validation"),
    ("arfuse/core/outputs.py", "output allocation"), ("arfuse/core/types.py", "FusedCall build"),
    ("arfuse/core/counters.py", "counters"), ("arfuse/core/spec.py", "spec lookup"),
    ("arfuse/runtime/executor.py", "plan lookup"), ("arfuse/runtime/custom_op.py", "dispatch"),
    ("arfuse/kernels/_launch.py", "kernel launch"),
    ("arfuse/core/math.py", "torch ops"), ("arfuse/backends/torch_ref.py", "torch ops"),
    ("arfuse/backends/", "launcher"), ("arfuse/kernels/", "launcher"),
    ("arfuse/api.py", "API"), ("arfuse/module.py", "API"), ("arfuse/functional.py", "API"),
    ("arfuse/probe/", "API"), ("arfuse/bench/", "other"),
    ("/triton/", "kernel launch"), ("__triton_launcher", "kernel launch"),
    ("torch/distributed/", "collective"), ("torch/_library/", "op dispatch"), ("torch/_ops.py", "op dispatch"),
)
_BY_NAME = (("torch.empty", "output allocation"), ("torch.full", "output allocation"),
            ("empty_like", "output allocation"), ("new_empty", "output allocation"),
            ("of 'torch._C._distributed", "collective"), ("launch", "kernel launch"))
_BY_FUNCTION = {"spec_of": "spec lookup", "_quant_fields": "spec lookup", "_flag": "validation",
                "_check_disjoint": "validation", "_check_open": "validation", "check_given": "validation",
                "_fast_checks": "validation", "accept": "validation", "_accept": "validation"}


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


# -- one world size --------------------------------------------------------------------------------------------
def candidate_backends(cfg: HostConfig, device: torch.device) -> List[str]:
    names = [b.name for b in base.registered() if device.type in b.support.devices]
    return [n for n in names if not cfg.backends or n in cfg.backends]


def host_rank(rank: int, world: int, cfg: HostConfig, device_type: str) -> dict:
    """Every case on every backend that runs here, on this rank (process group initialised or world 1 without
    one). Collective. Rank 0 gets every rank's slowest figure."""
    group = None
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # small ops: a thread pool only adds wake-ups (ms when the cores are busy)
    try:
        with torch.inference_mode():  # as an engine runs its forward
            return {"world_size": world, "rank": rank, "device": str(device),
                    "rows": _rows(cfg, device, group, world, Inputs(cfg, device, rank))}
    finally:
        torch.set_num_threads(threads)


def _rows(cfg: HostConfig, device: torch.device, group, world: int, inp: Inputs) -> List[dict]:
    rows = []
    for name in candidate_backends(cfg, device):
        try:
            fusion = arfuse.AllReduceFusion(group, max_tokens=max(cfg.tokens, 16), hidden_size=cfg.hidden,
                                            dtype=inp.dtype, device=device, backend=name)
        except Exception as e:  # noqa: BLE001 - a backend that cannot be built here is reported, not fatal
            rows.append({"backend": name, "case": None, "skipped": f"{type(e).__name__}: {e}"})
            continue
        try:
            plan = fusion.plan(FusionSpec(), cfg.tokens)
            if plan.backend != name:  # this backend runs nothing here (e.g. triton_symm at world size 1)
                rows.append({"backend": name, "case": None, "skipped": plan.reason})
                continue
            for case in cases(cfg):
                rows.append(_measure_case(case, name, fusion, inp, cfg, device, group, world))
        finally:
            fusion.close()
            F.close_all(group)
    return rows


def _measure_case(case: Case, backend: str, fusion, inp: Inputs, cfg: HostConfig, device, group, world) -> dict:
    plan = fusion.plan(case.spec, cfg.tokens)
    row = {"backend": backend, "case": case.name, "spec": case.spec.name, "form": case.form, "path": plan.key,
           "fallback": plan.reason if plan.fallback else None}
    fns = {"arfuse": arfuse_call(case, fusion, inp, group, backend)}
    made = []
    if case.form == "object" and not case.caller_outputs and plan.backend == backend:
        bare, made = bare_calls(case, backend, fusion, inp, group)
        fns.update(bare)
    fns["unfused"] = unfused_call(case, inp, group, world)
    try:
        samples = time_rounds(fns, cfg, device, group, world)
        if cfg.profile:
            parts = profile_call(fns["arfuse"], cfg.calls, device)
    finally:
        for ws in made:
            ws.close()
    every = vote.all_gather_object(samples, group) if world > 1 else [samples]
    worst = {k: [max(s[k][i] for s in every) for i in range(len(samples[k]))] for k in samples}
    row["timing"] = summarize(worst)
    if cfg.profile:
        row["profile_us"] = parts
        row["profile_scaled_us"] = scaled(parts, row["timing"]["arfuse"]["us"])
    return row


# -- the stubbed launch paths ---------------------------------------------------------------------------------
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


class _StubSymmWorkspace:
    """The parts of a ``SymmWorkspace`` the ``triton_symm`` backend's ``run`` reads."""

    def __init__(self, args):
        self.args = args

    def raise_if_failed(self) -> None:
        return None

    def is_zero_copy(self, x) -> bool:
        return False


def _symm_args(cfg: HostConfig, world: int = 4):
    from arfuse.kernels.launch_config import SymmArgs

    state = torch.zeros(64, dtype=torch.int32)
    ptrs = tuple(0x7F0000000000 + (r << 32) for r in range(world)) + (0,) * (8 - world)
    pads = tuple(0x7E0000000000 + (r << 32) for r in range(world)) + (0,) * (8 - world)
    slot = -(-cfg.tokens * cfg.hidden // 64) * 64
    return SymmArgs(peer_ptrs=ptrs, pad_ptrs=pads, err_ptr=0x10000, guard_ptr=0x20000, lamport_state=state[0:2],
                    one_shot_state=state[2:4], lts_state=state[4:6], barrier_gen=state[6:], rank=0, world_size=world,
                    timeout_ns=10 ** 10, max_grid=528, barrier_slots=288, sms=132, one_shot_off=0, one_shot_half=slot,
                    zero_copy_off=2 * slot, two_shot_off=3 * slot, two_shot_slot=slot, gather_off=8 * slot,
                    lamport_off=16 * slot, lamport_slot=slot, lamport_buffer=world * slot, lts_rs_off=32 * slot,
                    lts_rs_buffer=world * slot, lts_gather_off=48 * slot, lts_gather_buffer=slot)


def _stub_flashinfer_workspace(cfg: HostConfig, dtype, specs: Dict[FusionSpec, int], world: int = 4):
    """A FlashInfer workspace stand-in on the unified API whose fusion function is a no-op with FlashInfer
    0.7's parameter names, so ``FlashInferBackend.run`` builds its real argument list. ``specs``: spec -> the
    pattern code its route carries."""
    from arfuse.backends import flashinfer_adapter as adapter
    from arfuse.backends import flashinfer_patterns as patterns
    from arfuse.backends.flashinfer import FlashInferWorkspace
    from arfuse.probe import flashinfer_api as fi_api

    def allreduce_fusion(input, workspace, pattern, launch_with_pdl=False, output=None, residual_out=None,
                         norm_out=None, quant_out=None, scale_out=None, residual_in=None, rms_gamma=None,
                         rms_eps=1e-6, scale_factor=None, layout_code=None, use_oneshot=None,
                         trigger_completion_at_end=True, fp32_acc=False, block_quant_group_size=None,
                         weight_bias=0.0, expanded_idx_to_permuted_idx=None, expert_scale_factor=None,
                         shared_expert_output=None, moe_finalize_backend="trtllm"):
        return None

    info = fi_api.describe(fi_api.UNIFIED_FUSION, allreduce_fusion)
    handle = adapter.Handle(fi_api.UNIFIED, 0, world, 2048, cfg.hidden, dtype, None, info, allreduce_fusion,
                            {"use_oneshot_none": True}, workspace=object())
    ws = FlashInferWorkspace.__new__(FlashInferWorkspace)  # no shared FlashInfer workspace behind it
    base.Workspace.__init__(ws)
    ws.manager = ws.shared = None
    ws.handle, ws.index_guard = handle, None
    ws.probe = types.SimpleNamespace(version="0.7.4")  # a release that size-checks MoE by its token rows
    ws.scratch = torch.empty(max(cfg.tokens, 16), cfg.hidden, dtype=dtype)
    ws.zeros = torch.zeros_like(ws.scratch)
    ws.routes = {spec.code: patterns.Route(fi_api.UNIFIED_FUSION, patterns.member(spec), code)
                 for spec, code in specs.items()}
    ws.rows = {}
    return ws


STUB_SPECS = ("residual_rmsnorm", "residual_rmsnorm+fp8", "rmsnorm", "allreduce",
              "residual_rmsnorm+fp8_group128_ue8m0", "moe_finalize+residual_rmsnorm")


def stubbed_launchers(cfg: HostConfig) -> List[dict]:
    """µs per call of each GPU backend's ``run`` for a few specs on the CPU, nothing launched (see the module
    docstring and :func:`triton_stubbed`), next to ``bare``: the same kernel launches through ``kernel[grid]``
    with their arguments prebuilt (for FlashInfer: its function called with the arguments prebuilt). Not
    collective; needs Triton, no GPU."""
    from arfuse.backends.base import IndexGuard
    from arfuse.backends.flashinfer import FlashInferBackend
    from arfuse.backends.nccl import NcclNormBackend, NcclWorkspace
    from arfuse.backends.triton_symm import TritonSymmBackend

    dtype = getattr(torch, cfg.dtype)
    inp = Inputs(cfg, torch.device("cpu"))
    by_name: Dict[str, Case] = {}
    for c in cases(HostConfig(**{**asdict(cfg), "cases": ()})):
        if c.form == "object" and not (c.inplace or c.caller_outputs):
            by_name.setdefault(c.spec.name, c)
    specs = [by_name[s] for s in STUB_SPECS if s in by_name]
    guard = IndexGuard.__new__(IndexGuard)  # no pinned memory on a CPU-only torch
    guard.ptr = 0x30000
    nccl_ws = NcclWorkspace(None, 1, torch.empty(max(cfg.tokens, 16), cfg.hidden, dtype=dtype), guard)
    symm_ws = _StubSymmWorkspace(_symm_args(cfg))
    fi_ws = _stub_flashinfer_workspace(cfg, dtype, {c.spec: k for k, c in enumerate(specs)})
    paths = [("nccl", "default", NcclNormBackend(), nccl_ws)]
    paths += [("triton_symm", v, TritonSymmBackend(), symm_ws)
              for v in ("lamport", "one_shot", "two_shot", "lamport_two_shot")]
    paths += [("flashinfer", "auto", FlashInferBackend(), fi_ws)]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(), triton_stubbed():
            _stub_rows(cfg, paths, specs, inp, rows)
    finally:
        torch.set_num_threads(threads)
    return rows


def _stub_rows(cfg: HostConfig, paths, specs, inp: Inputs, rows: list) -> None:
    from arfuse.backends.flashinfer import _fusion_call, _moe_call

    for backend, variant, impl, ws in paths:
        for case in specs:
            call = prepared_call(case, inp)

            def fn(impl=impl, ws=ws, variant=variant, spec=case.spec, call=call):
                impl.run(ws, variant, spec, call)

            fns = {"launcher": fn}
            try:
                if backend == "flashinfer":
                    spec = case.spec
                    f, a, kw = (_moe_call if spec.moe else _fusion_call)(ws, variant, spec, call, ws.route(spec))
                    fns["bare"] = lambda f=f, a=a, kw=kw: f(*a, **kw)
                else:
                    launches = recorded_launches(fn)

                    def bare(launches=launches):
                        for k, grid, a, kw in launches:
                            k[grid](*a, **kw)

                    fns["bare"] = bare
                samples = time_rounds(fns, cfg, torch.device("cpu"), None, 1)
            except Exception as e:  # noqa: BLE001 - a path the stub cannot drive is reported
                rows.append({"backend": backend, "variant": variant, "spec": case.spec.name,
                             "error": f"{type(e).__name__}: {e}"})
                continue
            row = {"backend": backend, "variant": variant, "spec": case.spec.name, "timing": summarize(samples)}
            if cfg.profile:
                row["profile_us"] = profile_call(fn, cfg.calls, torch.device("cpu"))
            rows.append(row)


# -- the document and the tables -----------------------------------------------------------------------------
def document(machine: dict, cfg: HostConfig, device: str, runs: List[dict], stubbed: Optional[List[dict]]) -> dict:
    return {"format": FORMAT, "version": VERSION, "machine": machine, "device": device, "config": asdict(cfg),
            "method": ("host wall time per eager call (perf_counter_ns around back-to-back calls; CUDA synchronised "
                       "after the loop, outside the timed part); median of rounds; slowest rank"),
            "targets": {"gpu_ratio_vs_bare_launch": GPU_TARGET_RATIO, "cpu_overhead_vs_torch_ref_us": CPU_TARGET_US},
            "runs": runs, "stubbed_launchers": stubbed, "stub_note": STUB_NOTE}


def validate(doc: object) -> None:
    """ValueError unless ``doc`` is a host-bench document."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError("not an arfuse host-bench document")
    for run in doc.get("runs", []):
        for row in run.get("rows", []):
            if row.get("case") and "timing" not in row:
                raise ValueError(f"row {row.get('case')} has no timing")


def verdict(row: dict, device: str) -> str:
    t = row.get("timing", {})
    a, b = t.get("arfuse"), t.get("bare")
    if not a or not b:
        return ""
    if device == "cuda" and row["backend"] != "torch_ref":
        ratio = a["us"] / b["us"]
        return f"{ratio:.2f}x {'ok' if ratio <= GPU_TARGET_RATIO else 'MISSED'}"
    over = a.get("over_bare_us", a["us"] - b["us"])
    return f"+{over:.1f} {'ok' if over <= CPU_TARGET_US else 'MISSED'}"


def print_report(doc: dict, console) -> None:
    from rich.table import Table

    device = doc["device"]
    for run in doc["runs"]:
        table = Table(title=f"arfuse host cost per eager call, world size {run['world_size']} on {run['device']} "
                            f"(µs, median of {doc['config']['samples']} x {doc['config']['calls']} calls; hidden "
                            f"{doc['config']['hidden']}, {doc['config']['tokens']} tokens, {doc['config']['dtype']})")
        for col in ("backend", "case", "path", "arfuse", "bare", "bare direct", "unfused", "vs bare / target"):
            table.add_column(col, justify="left" if col in ("backend", "case", "path") else "right")
        for row in run["rows"]:
            if row.get("case") is None:
                table.add_row(row["backend"], "-", row.get("skipped", ""), "", "", "", "", "")
                continue
            t = row["timing"]

            def cell(k):
                return f"{t[k]['us']:.1f}" if k in t else "-"

            path = row["path"] + (" (fallback)" if row.get("fallback") else "")
            table.add_row(row["backend"], row["case"], path, cell("arfuse"), cell("bare"), cell("bare_direct"),
                          cell("unfused"), verdict(row, device))
        console.print(table)
        profiled = [r for r in run["rows"] if r.get("profile_scaled_us")]
        if profiled:
            parts = [p for p in PARTS if any(r["profile_scaled_us"].get(p, 0) >= 0.05 for r in profiled)]
            ptable = Table(title="where the µs go (cProfile shares scaled to the unprofiled time, µs per call)")
            ptable.add_column("backend")
            ptable.add_column("case")
            for p in parts:
                ptable.add_column(p, justify="right")
            for r in profiled:
                ptable.add_row(r["backend"], r["case"], *(f"{r['profile_scaled_us'].get(p, 0.0):.1f}" for p in parts))
            console.print(ptable)
    if doc.get("stubbed_launchers"):
        table = Table(title=f"launch paths (µs per call): {doc['stub_note']}")
        for col in ("backend", "variant", "spec", "arfuse launch path", "bare launch", "difference"):
            table.add_column(col, justify="left" if col in ("backend", "variant", "spec") else "right")
        for row in doc["stubbed_launchers"]:
            if "error" in row:
                table.add_row(row["backend"], row["variant"], row["spec"], row["error"], "", "")
                continue
            t = row["timing"]
            table.add_row(row["backend"], row["variant"], row["spec"], f"{t['launcher']['us']:.1f}",
                          f"{t['bare']['us']:.1f}" if "bare" in t else "-",
                          f"{t['launcher']['over_bare_us']:+.1f}" if "bare" in t else "")
        console.print(table)
