"""``arfuse bench --epilogue``: the ``nccl`` path's own kernels alone on one GPU (world size 1: what runs after
NCCL's all_reduce, and the MoE finalize prologue before it), for each spec kind, against ``torch.compile`` of the
same math (``arfuse.core.math``), with the bytes each call must move and the share of the HBM bandwidth measured
in the same run (a device-to-device copy).

It first sweeps the epilogue's launch configurations (rows per tile, warps, CTA cap) on a few kinds and token
counts and picks per hidden size the configuration whose worst slowdown against the best one at any swept point is
least (:func:`recommend`, for ``launch_config.EPILOGUE_LAUNCH``); then it times every kind at every size with the
current default launch, the recommended one and ``torch.compile``. Every configuration is checked against the
float64 reference before it is timed; a wrong one is FAILED, not timed. Timing: CUDA graphs of
``calls_per_graph`` launches (:func:`arfuse.bench.timing.time_cuda_graph`), mean per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from arfuse.backends.base import IndexGuard
from arfuse.bench.timing import TimingConfig, time_cuda_graph
from arfuse.core import math as fmath, outputs as out_specs
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout
from arfuse.core.types import FusedCall
from arfuse.kernels import launch_config as lc
from arfuse.verify import Case, output_errors, poisoned_outputs

FORMAT = "arfuse-epilogue-bench"
_UE8M0 = dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0)
KINDS: Dict[str, FusionSpec] = {
    "residual_rmsnorm": FusionSpec(), "offset": FusionSpec(weight_offset=True),
    "fp8_static": FusionSpec(quant=Quant.FP8_STATIC),
    "fp8_per_token+norm": FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32, also_norm=True),
    "fp8_group128": FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.FP32),
    "fp8_group128_ue8m0": FusionSpec(**_UE8M0), "fp8_group128_ue8m0+norm": FusionSpec(also_norm=True, **_UE8M0),
    "moe_prologue": FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True),  # the kernel before NCCL
}
DEFAULT_TOKENS = tuple(1 << k for k in range(15))  # 1 .. 16384
DEFAULT_HIDDEN = (4096, 5120, 7168, 8192)
SWEEP_KINDS = ("residual_rmsnorm", "fp8_group128_ue8m0+norm")  # the lightest epilogue and the heaviest
SWEEP_TOKENS = (1, 64, 1024, 4096, 16384)
CHECK_TOKENS = 37  # odd: tiles and the persistent grid end part-way


@dataclass(frozen=True)
class EpilogueConfig:
    hidden: Tuple[int, ...] = DEFAULT_HIDDEN
    tokens: Tuple[int, ...] = DEFAULT_TOKENS
    dtype: torch.dtype = torch.bfloat16
    kinds: Tuple[str, ...] = tuple(KINDS)
    sweep_kinds: Tuple[str, ...] = SWEEP_KINDS
    sweep_tokens: Tuple[int, ...] = SWEEP_TOKENS
    top_k: int = 8
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(calls_per_graph=20, warmup=2, replays=10))


def bytes_moved(spec: FusionSpec, tokens: int, hidden: int, itemsize: int, top_k: int = 8) -> int:
    """The HBM bytes one call must read and write (the weight counted once)."""
    row = tokens * hidden * itemsize
    if spec.moe:  # top_k expert rows, the shared row and the output row per token; indices and scales
        return row * (top_k + 2) + tokens * top_k * 8
    n = row * (2 if spec.residual else 1) + hidden * itemsize  # the sum (+ residual) and the weight read
    n += row if spec.residual else 0  # residual_out
    n += tokens * hidden * (1 if spec.quant else itemsize)
    n += row if spec.also_norm else 0
    groups = spec.groups(hidden)
    n += tokens * (-(-groups // 4) if spec.scale_layout is ScaleLayout.UE8M0 else groups) * 4
    return n


def launch_space(hidden: int, sms: int) -> List[lc.EpilogueLaunch]:
    """The launches the sweep tries: 1/2/4 rows per tile, 4/8/16 warps, at 8 to 64 elements per thread, capped at
    4 or 8 CTAs per SM or one CTA per tile; the default launch is always among them."""
    block_h = lc.next_power_of_2(hidden)
    found = [lc.default_epilogue_launch(hidden)]
    for rows in (1, 2, 4):
        for warps in (4, 8, 16):
            if not 8 <= rows * block_h // (32 * warps) <= 64:
                continue
            for ctas in (4 * sms, 8 * sms, 0):
                launch = lc.EpilogueLaunch(block_h, rows, warps, ctas)
                if launch not in found:
                    found.append(launch)
    return found


def recommend(sweep: List[dict]) -> Dict[int, dict]:
    """Per hidden size, the launch whose worst ratio to the best launch at any swept (kind, tokens) is least."""
    best: Dict[tuple, float] = {}
    for m in sweep:
        key = (m["hidden"], m["kind"], m["tokens"])
        best[key] = min(best.get(key, float("inf")), m["us"])
    worst: Dict[Tuple[int, tuple], float] = {}
    for m in sweep:
        key = (m["hidden"], tuple(m["launch"]))
        worst[key] = max(worst.get(key, 0.0), m["us"] / best[(m["hidden"], m["kind"], m["tokens"])])
    points = {}
    for (hidden, _, _), _ in best.items():
        points[hidden] = points.get(hidden, 0) + 1
    chosen: Dict[int, dict] = {}
    for (hidden, launch), ratio in sorted(worst.items()):
        complete = sum(1 for m in sweep if m["hidden"] == hidden and tuple(m["launch"]) == launch) == points[hidden]
        if complete and (hidden not in chosen or ratio < chosen[hidden]["worst_ratio"]):
            chosen[hidden] = {"launch": list(launch), "worst_ratio": ratio}
    return chosen


# -- inputs, the kernels and torch.compile ---------------------------------------------------------------------
def _random_call(spec: FusionSpec, tokens: int, hidden: int, dtype: torch.dtype, top_k: int, device):
    """(sum or expert rows, a FusedCall writing fresh outputs) with device-side random inputs (fast at any size)."""
    g = torch.Generator(device=device).manual_seed(tokens + hidden)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    made = out_specs.prepare("bench", spec, tokens, hidden, dtype, device, {}, {})
    moe = {}
    if spec.moe:
        rows = tokens * top_k
        x = rand(rows, hidden)
        moe = dict(expert_idx=torch.randint(0, rows, (tokens, top_k), generator=g, device=device, dtype=torch.int32),
                   expert_scales=torch.rand(tokens, top_k, generator=g, device=device), shared=rand(tokens, hidden))
        made["out"] = torch.empty(tokens, hidden, dtype=dtype, device=device)
    else:
        x = rand(tokens, hidden)
    call = FusedCall(x, made["out"], residual=rand(tokens, hidden) if spec.residual else None,
                     weight=1 + 0.1 * rand(hidden), eps=1e-6, weight_offset=1.0 if spec.weight_offset else 0.0,
                     scale=torch.full((1,), 0.05, device=device), residual_out=made.get("residual_out"),
                     norm_out=made.get("norm_out"), scale_out=made.get("scale_out"), **moe)
    return x, call


def _kernel(spec: FusionSpec, x, call, guard: IndexGuard, launch: Optional[lc.EpilogueLaunch]) -> Callable:
    from arfuse.kernels.nccl_epilogue import moe_finalize, rmsnorm_epilogue

    if spec.moe:
        return lambda: moe_finalize(call, spec, guard.ptr, call.out)
    return lambda: rmsnorm_epilogue(x, call, spec, launch)


_COMPILED: Dict[FusionSpec, Callable] = {}


def _compiled(spec: FusionSpec) -> Callable:
    """``torch.compile`` of the spec's math: token count dynamic, hidden size static (as a model would have)."""
    if spec not in _COMPILED:
        from arfuse.bench.peers import _raise_recompile_limit

        _raise_recompile_limit(256)

        def epilogue(x, residual, weight, scale, out, residual_out, norm_out, scale_out):
            call = FusedCall(x, out, residual=residual, weight=weight, eps=1e-6,
                             weight_offset=1.0 if spec.weight_offset else 0.0, scale=scale, residual_out=residual_out,
                             norm_out=norm_out, scale_out=scale_out)
            fmath.epilogue(spec, x, call)

        def moe(x, idx, scales, shared, out):
            out.copy_(fmath.moe_finalize(FusedCall(x, out, expert_idx=idx, expert_scales=scales, shared=shared),
                                         out.dtype))

        _COMPILED[spec] = torch.compile(moe if spec.moe else epilogue)
    return _COMPILED[spec]


def _compiled_call(spec: FusionSpec, x, call) -> Callable:
    fn = _compiled(spec)
    if spec.moe:
        args = (x, call.expert_idx, call.expert_scales, call.shared, call.out)
    else:
        args = (x, call.residual, call.weight, call.scale, call.out, call.residual_out, call.norm_out, call.scale_out)
    for t in args:
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    return lambda: fn(*args)


def check_launch(spec: FusionSpec, hidden: int, dtype: torch.dtype, launch, guard: IndexGuard, device) -> dict:
    """``{output: (error, tolerance)}`` of one launch against the float64 reference (NaN-poisoned outputs)."""
    from arfuse.kernels.nccl_epilogue import moe_finalize, rmsnorm_epilogue

    case = Case(CHECK_TOKENS, hidden, dtype, seed=hidden, weight_offset=1.0 if spec.weight_offset else 0.0)
    outputs = poisoned_outputs(spec, case, device)
    x = (case.expert_out(0, device) if spec.moe else case.x(0, device))
    moe = dict(expert_idx=case.permuted_idx(0, device), expert_scales=case.expert_scales(0, device),
               shared=case.shared_expert_out(0, device)) if spec.moe else {}
    call = FusedCall(x, outputs["out"], residual=case.residual(device), weight=case.weight(device), eps=case.eps,
                     weight_offset=case.weight_offset, scale=torch.full((1,), case.scale, device=device),
                     residual_out=outputs.get("residual_out"), norm_out=outputs.get("norm_out"),
                     scale_out=outputs.get("scale_out"), **moe)
    summed = x
    if spec.moe:
        summed = torch.empty(CHECK_TOKENS, hidden, dtype=dtype, device=device)
        moe_finalize(call, spec, guard.ptr, summed)
    rmsnorm_epilogue(summed, call, spec, launch)
    torch.cuda.synchronize(device)
    return output_errors(spec, case, 1, outputs)


# Nominal HBM bandwidth (GB/s) by device name, for the record next to the measured reference
NOMINAL_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100": 3350.0, "B200": 8000.0}


def nominal_gbps(device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_GBPS.items() if k in name), None)


def measure_copies_gbps(device, nbytes: int = 1 << 30) -> Dict[str, float]:
    """Bytes read + written per second (GB/s) of two copies of ``nbytes``: torch's and a plain Triton stream. The
    faster is the 100% of the tables (on the first H200 run, 2026-12-02, torch's copy alone reached 2.8 TB/s while
    the epilogue kernels moved 4.1, so torch's copy is not the HBM's rate)."""
    from arfuse.kernels.stream_copy import stream_copy

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    timing = TimingConfig(calls_per_graph=10, warmup=2, replays=10)
    found = {}
    for name, fn in (("torch_copy", lambda: dst.copy_(src)), ("triton_stream", lambda: stream_copy(src, dst))):
        found[name] = 2 * nbytes / (time_cuda_graph(fn, None, timing) * 1e3)
    return found





def _record(kind, spec, hidden, tokens, path, launch, us, cfg, hbm) -> dict:
    n = bytes_moved(spec, tokens, hidden, torch.empty((), dtype=cfg.dtype).element_size(), cfg.top_k)
    gbps = n / (us * 1e3)
    return {"kind": kind, "spec": spec.name, "hidden": hidden, "tokens": tokens, "path": path,
            "launch": list(launch[1:]) if launch else None, "us": us, "bytes": n, "gbps": gbps,
            "pct_hbm": 100.0 * gbps / hbm}


def run(cfg: EpilogueConfig, device, progress: Callable[[str], None] = lambda s: None,
        on_update: Callable[[dict], None] = lambda doc: None) -> dict:
    """The whole benchmark on ``device`` (one CUDA GPU); returns the JSON document. ``on_update(doc)`` runs after
    each hidden size, so a run cut short leaves its finished part behind."""
    device = torch.device(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    guard = IndexGuard(device)
    copies = measure_copies_gbps(device)
    doc = {"format": FORMAT, "version": 1, "config": {
        "hidden": list(cfg.hidden), "tokens": list(cfg.tokens), "dtype": str(cfg.dtype).replace("torch.", ""),
        "kinds": {k: KINDS[k].name for k in cfg.kinds}, "sweep_kinds": list(cfg.sweep_kinds),
        "sweep_tokens": list(cfg.sweep_tokens), "top_k": cfg.top_k,
        "timing": f"cuda-graph: {cfg.timing.calls_per_graph} launches per graph, {cfg.timing.warmup} warm-up replays, "
                  f"mean of {cfg.timing.replays} replays per launch"},
        "hbm_gbps": max(copies.values()), "copies_gbps": copies, "nominal_gbps": nominal_gbps(device),
        "sweep": [], "recommended": {}, "measurements": [], "failed": []}
    hbm = doc["hbm_gbps"]
    timing = cfg.timing
    for hidden in cfg.hidden:
        launches = launch_space(hidden, sms)
        for kind in cfg.sweep_kinds:
            spec = KINDS[kind]
            timed: Dict[tuple, float] = {}  # launches that differ only in a CTA cap the grid never reaches
            for launch in launches:
                if not _passes(doc, kind, spec, hidden, cfg, launch, guard, device):
                    continue
                for tokens in cfg.sweep_tokens:
                    same = (tokens, launch.rows, launch.num_warps, lc.epilogue_grid(tokens, launch))
                    if same not in timed:
                        progress(f"sweep {kind} hidden {hidden} {tuple(launch[1:])} tokens {tokens}")
                        x, call = _random_call(spec, tokens, hidden, cfg.dtype, cfg.top_k, device)
                        timed[same] = time_cuda_graph(_kernel(spec, x, call, guard, launch), None, timing)
                    doc["sweep"].append(_record(kind, spec, hidden, tokens, "arfuse", launch, timed[same], cfg, hbm))
        chosen = recommend([m for m in doc["sweep"] if m["hidden"] == hidden]).get(hidden)
        if chosen:
            doc["recommended"][str(hidden)] = chosen
        rec = lc.EpilogueLaunch(lc.next_power_of_2(hidden), *chosen["launch"]) if chosen else None
        default = lc.epilogue_launch(hidden, 1)
        for kind in cfg.kinds:
            spec = KINDS[kind]
            paths = [("arfuse/default", default)] + ([("arfuse/recommended", rec)] if rec and not spec.moe else [])
            paths = [(p, launch) for p, launch in paths if _passes(doc, kind, spec, hidden, cfg, launch, guard, device)]
            for tokens in cfg.tokens:
                progress(f"{kind} hidden {hidden} tokens {tokens}")
                x, call = _random_call(spec, tokens, hidden, cfg.dtype, cfg.top_k, device)
                for path, launch in paths:
                    us = time_cuda_graph(_kernel(spec, x, call, guard, launch), None, timing)
                    doc["measurements"].append(_record(kind, spec, hidden, tokens, path, launch, us, cfg, hbm))
                us = time_cuda_graph(_compiled_call(spec, x, call), None, timing)
                doc["measurements"].append(_record(kind, spec, hidden, tokens, "torch.compile", None, us, cfg, hbm))
                del x, call
        on_update(doc)
    doc["index_guard"] = guard.message()  # random indices are all in range: must stay None
    return doc


def _passes(doc, kind, spec, hidden, cfg, launch, guard, device) -> bool:
    errors = check_launch(spec, hidden, cfg.dtype, launch, guard, device)
    if all(e <= t for e, t in errors.values()):
        return True
    failure = {"kind": kind, "hidden": hidden, "launch": list(launch[1:]), "errors": errors}
    if failure not in doc["failed"]:
        doc["failed"].append(failure)
    return False


def command(hidden: Optional[Tuple[int, ...]], tokens: Optional[Tuple[int, ...]], dtype: str,
            json_path: Optional[str], warmup: int, replays: int, progress: bool = True,
            kinds: Optional[Tuple[str, ...]] = None) -> int:
    """``arfuse bench --epilogue``: run, print the tables, write ``json_path`` (after every hidden size too);
    ``kinds``: the kinds to time (default: all of ``KINDS``).
    Returns the exit code: 1 if a launch FAILED its check, 2 without a CUDA device, else 0."""
    import json
    import sys
    from pathlib import Path

    from arfuse.bench import epilogue_report
    from arfuse.bench.report import machine_info

    if not torch.cuda.is_available():
        print("arfuse bench --epilogue: needs a CUDA device", file=sys.stderr)
        return 2
    kinds = tuple(kinds or KINDS)
    cfg = EpilogueConfig(hidden=tuple(hidden or DEFAULT_HIDDEN), tokens=tuple(tokens or DEFAULT_TOKENS), kinds=kinds,
                         sweep_kinds=tuple(k for k in SWEEP_KINDS if k in kinds),
                         dtype=getattr(torch, dtype), timing=TimingConfig(calls_per_graph=20, warmup=warmup,
                                                                          replays=replays))
    machine = machine_info()

    def save(doc):
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps({**doc, "machine": machine}, indent=1, allow_nan=False) + "\n")

    report = (lambda s: print(f"\r{s:<80}", end="", file=sys.stderr)) if progress else (lambda s: None)
    doc = run(cfg, "cuda", progress=report, on_update=save)
    if progress:
        print(file=sys.stderr)
    save(doc)
    epilogue_report.print_report(doc)
    if json_path:
        print(f"arfuse bench --epilogue: wrote {json_path}")
    return 1 if doc["failed"] else 0
