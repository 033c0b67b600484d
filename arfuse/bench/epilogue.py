"""``arfuse bench --epilogue``: the ``nccl`` path's own kernels alone on one GPU (world size 1: what runs after
NCCL's all_reduce, and the MoE finalize prologue before it), for each spec kind, against ``torch.compile`` of the
same math (``arfuse.core.math``), with the bytes each call must move and the share of the HBM bandwidth measured
in the same run (a device-to-device copy).

It first sweeps each kernel's launches at every token count: the epilogue's (rows per tile, warps, CTA cap,
evict-first loads) on a few kinds, the MoE finalize's (columns per tile, warps, CTA cap, slots per step) on the
MoE kind, and chooses per hidden size the launch for each token range (:mod:`arfuse.bench.launch_ranges`; the
document's ``launch_table`` holds them in ``arfuse.kernels.launch_table``'s format). Then it times every kind at
every size with the launch the current table gives (``arfuse/default``), the chosen one (``arfuse/tuned``) and
``torch.compile``. Every launch is checked against the float64 reference before it is timed; a wrong one is
FAILED, not timed. Timing: CUDA graphs of ``calls_per_graph`` launches (:func:`arfuse.bench.timing.time_cuda_graph`),
mean per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from arfuse.backends.base import IndexGuard
from arfuse.bench import launch_ranges
from arfuse.bench.report import machine_info
from arfuse.bench.timing import TimingConfig, time_cuda_graph
from arfuse.core import math as fmath, operands
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout
from arfuse.core.types import FusedCall
from arfuse.kernels import launch_config as lc, nccl_launch as nl
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
MOE_KIND = "moe_prologue"
CHECK_TOKENS = 37  # odd: tiles and the persistent grid end part-way


@dataclass(frozen=True)
class EpilogueConfig:
    """``sweep_tokens``: where the launches are swept (None: every token count); ``compare``: time every kind
    against torch.compile after the sweep (False: the sweep and its table only, as ``arfuse tune`` runs it)."""

    hidden: Tuple[int, ...] = DEFAULT_HIDDEN
    tokens: Tuple[int, ...] = DEFAULT_TOKENS
    dtype: torch.dtype = torch.bfloat16
    kinds: Tuple[str, ...] = tuple(KINDS)
    sweep_kinds: Tuple[str, ...] = SWEEP_KINDS
    sweep_tokens: Optional[Tuple[int, ...]] = None
    top_k: int = 8
    compare: bool = True
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


def launch_space(hidden: int, sms: int) -> List[nl.EpilogueLaunch]:
    """The epilogue launches the sweep tries: 1 or 2 rows per tile (4 never won a point in two runs), 4/8/16 warps,
    at 8 to 64 elements per thread, capped at 4 CTAs per SM or one CTA per tile, loads plain or evict-first; the
    default launch first."""
    block_h = lc.next_power_of_2(hidden)
    found = [nl.default_epilogue_launch(hidden)]
    for evict in (False, True):
        for rows in (1, 2):
            for warps in (4, 8, 16):
                if not 8 <= rows * block_h // (32 * warps) <= 64:
                    continue
                for ctas in (4 * sms, 0):
                    launch = nl.EpilogueLaunch(block_h, rows, warps, ctas, evict)
                    if launch not in found:
                        found.append(launch)
    return found


def moe_space(hidden: int) -> List[nl.MoeLaunch]:
    """The MoE finalize launches the sweep tries: the default (a token's whole row per CTA, four slots per step),
    the same one slot per step (the load order before 2026-12), and a token's columns split over CTAs of 512 to
    2048 columns (8 per thread) with four or eight slots per step, one CTA per tile."""
    default = nl.default_moe_launch(hidden)
    found = [default, default._replace(slots=1)]
    for block_h in (2048, 1024, 512):
        if block_h < default.block_h:
            found += [nl.MoeLaunch(block_h, max(2, block_h // 256), 0, slots) for slots in (4, 8)]
    return found


def _launch_list(launch) -> list:
    """A launch as its launch-table fields' values (the epilogue's block_h is the row's: left out)."""
    return list(launch[1:]) if isinstance(launch, nl.EpilogueLaunch) else list(launch)


def _launch_of(kernel: str, hidden: int, values) -> object:
    if kernel == "epilogue":
        return nl.EpilogueLaunch(lc.next_power_of_2(hidden), *values)
    return nl.MoeLaunch(*values)


# -- inputs, the kernels and torch.compile ---------------------------------------------------------------------
def _random_call(spec: FusionSpec, tokens: int, hidden: int, dtype: torch.dtype, top_k: int, device):
    """(sum or expert rows, a FusedCall writing fresh outputs) with device-side random inputs (fast at any size)."""
    g = torch.Generator(device=device).manual_seed(tokens + hidden)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    made = operands.allocate_all(spec, tokens, hidden, dtype, device)
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


def _kernel(spec: FusionSpec, x, call, guard: IndexGuard, launch) -> Callable:
    """The kernel ``spec``'s kind times: the MoE finalize (MoE kinds) or the epilogue, with ``launch``."""
    from arfuse.kernels.nccl_epilogue import moe_finalize, rmsnorm_epilogue

    if spec.moe:
        return lambda: moe_finalize(call, spec, guard.ptr, call.out, launch)
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


def check_launch(spec: FusionSpec, hidden: int, dtype: torch.dtype, launch, guard: IndexGuard, device,
                 top_k: int = 8) -> dict:
    """``{output: (error, tolerance)}`` of one launch (the epilogue's, or for MoE kinds the MoE finalize's with the
    epilogue's current launch) against the float64 reference (NaN-poisoned outputs)."""
    from arfuse.kernels.nccl_epilogue import moe_finalize, rmsnorm_epilogue

    case = Case(CHECK_TOKENS, hidden, dtype, seed=hidden, weight_offset=1.0 if spec.weight_offset else 0.0,
                top_k=top_k)
    outputs = poisoned_outputs(spec, case, device)
    x = (case.expert_out(0, device) if spec.moe else case.x(0, device))
    moe = dict(expert_idx=case.permuted_idx(0, device), expert_scales=case.expert_scales(0, device),
               shared=case.shared_expert_out(0, device) if spec.shared_expert else None) if spec.moe else {}
    call = FusedCall(x, outputs["out"], residual=case.residual(device), weight=case.weight(device), eps=case.eps,
                     weight_offset=case.weight_offset, scale=torch.full((1,), case.scale, device=device),
                     residual_out=outputs.get("residual_out"), norm_out=outputs.get("norm_out"),
                     scale_out=outputs.get("scale_out"), **moe)
    summed = x
    if spec.moe:
        summed = torch.empty(CHECK_TOKENS, hidden, dtype=dtype, device=device)
        moe_finalize(call, spec, guard.ptr, summed, launch)
    rmsnorm_epilogue(summed, call, spec, None if spec.moe else launch)
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
            "launch": _launch_list(launch) if launch else None, "us": us, "bytes": n, "gbps": gbps,
            "pct_hbm": 100.0 * gbps / hbm}


class _Run:
    """One benchmark run: its document, the index guard, and which launches passed their check."""

    def __init__(self, cfg: EpilogueConfig, device: torch.device, progress: Callable[[str], None]):
        self.cfg, self.device, self.progress = cfg, device, progress
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.guard = IndexGuard(device)
        self.checked: Dict[tuple, bool] = {}
        copies = measure_copies_gbps(device)
        config = {"hidden": list(cfg.hidden), "tokens": list(cfg.tokens), "dtype": str(cfg.dtype).replace("torch.", ""),
                  "kinds": {k: KINDS[k].name for k in cfg.kinds}, "sweep_kinds": list(cfg.sweep_kinds),
                  "sweep_tokens": list(cfg.sweep_tokens or cfg.tokens), "top_k": cfg.top_k,
                  "timing": f"cuda-graph: {cfg.timing.calls_per_graph} launches per graph, {cfg.timing.warmup} "
                            f"warm-up replays, mean of {cfg.timing.replays} replays per launch"}
        self.doc = {"format": FORMAT, "version": 2, "machine": machine_info(), "gpu": torch.cuda.get_device_name(device),
                    "config": config, "hbm_gbps": max(copies.values()), "copies_gbps": copies,
                    "nominal_gbps": nominal_gbps(device), "sweep": [], "ranges": {}, "launch_table": None,
                    "measurements": [], "failed": []}

    def passes(self, kind: str, hidden: int, launch) -> bool:
        """Whether ``launch`` matches the float64 reference for ``kind`` (checked once; a failure is recorded)."""
        key = (kind, hidden, launch)
        if key not in self.checked:
            errors = check_launch(KINDS[kind], hidden, self.cfg.dtype, launch, self.guard, self.device,
                                  self.cfg.top_k)
            self.checked[key] = all(e <= t for e, t in errors.values())
            if not self.checked[key]:
                self.doc["failed"].append({"kind": kind, "hidden": hidden, "launch": _launch_list(launch),
                                           "errors": errors})
        return self.checked[key]

    def record(self, kind: str, hidden: int, tokens: int, path: str, launch, us: float) -> dict:
        return _record(kind, KINDS[kind], hidden, tokens, path, launch, us, self.cfg, self.doc["hbm_gbps"])

    def sweep(self, kernel: str, hidden: int, kinds: Sequence[str], launches: list, tokens: Sequence[int]) -> None:
        """Time every launch that passes its check at every token count for ``kinds``; launches that differ only
        in a CTA cap the grid does not reach are timed once."""
        cfg = self.cfg
        for kind in kinds:
            passing = [launch for launch in launches if self.passes(kind, hidden, launch)]
            for n in tokens:
                x, call = _random_call(KINDS[kind], n, hidden, cfg.dtype, cfg.top_k, self.device)
                timed: Dict[tuple, float] = {}
                for launch in passing:
                    grid = nl.epilogue_grid(n, launch) if kernel == "epilogue" else nl.moe_grid(n, hidden, launch)
                    same = (launch._replace(max_ctas=0), grid)
                    if same not in timed:
                        self.progress(f"sweep {kind} hidden {hidden} {tuple(_launch_list(launch))} tokens {n}")
                        timed[same] = time_cuda_graph(_kernel(KINDS[kind], x, call, self.guard, launch), None,
                                                      cfg.timing)
                    self.doc["sweep"].append(dict(self.record(kind, hidden, n, "arfuse", launch, timed[same]),
                                                  kernel=kernel))
                del x, call

    def compare(self, kind: str, hidden: int, tuned: Optional[launch_ranges.Ranges]) -> None:
        """Time ``kind`` at every token count with the current table's launch, the tuned one and torch.compile."""
        cfg, spec = self.cfg, KINDS[kind]
        kernel, current = ("moe_finalize", nl.moe_launch) if spec.moe else ("epilogue", nl.epilogue_launch)
        for n in cfg.tokens:
            self.progress(f"{kind} hidden {hidden} tokens {n}")
            x, call = _random_call(spec, n, hidden, cfg.dtype, cfg.top_k, self.device)
            paths = [("arfuse/default", current(hidden, n, cfg.dtype, self.index))]
            if tuned:
                paths.append(("arfuse/tuned", _launch_of(kernel, hidden, launch_ranges.launch_at(tuned, n))))
            timed: Dict[object, float] = {}
            for path, launch in paths:
                if self.passes(kind, hidden, launch):
                    if launch not in timed:
                        timed[launch] = time_cuda_graph(_kernel(spec, x, call, self.guard, launch), None, cfg.timing)
                    self.doc["measurements"].append(self.record(kind, hidden, n, path, launch, timed[launch]))
            us = time_cuda_graph(_compiled_call(spec, x, call), None, cfg.timing)
            self.doc["measurements"].append(self.record(kind, hidden, n, "torch.compile", None, us))
            del x, call


def run(cfg: EpilogueConfig, device, progress: Callable[[str], None] = lambda s: None,
        on_update: Callable[[dict], None] = lambda doc: None) -> dict:
    """The whole benchmark on ``device`` (one CUDA GPU); returns the JSON document. ``on_update(doc)`` runs after
    each hidden size, so a run cut short leaves its finished part behind."""
    from arfuse.kernels import launch_table

    bench = _Run(cfg, torch.device(device), progress)
    doc = bench.doc
    tokens = tuple(cfg.sweep_tokens or cfg.tokens)
    for hidden in cfg.hidden:
        if cfg.sweep_kinds:
            bench.sweep("epilogue", hidden, cfg.sweep_kinds, launch_space(hidden, bench.sms), tokens)
        if MOE_KIND in cfg.kinds:
            bench.sweep("moe_finalize", hidden, (MOE_KIND,), moe_space(hidden), tokens)
        chosen = {}
        for kernel in ("epilogue", "moe_finalize"):
            ranges = launch_ranges.choose([m for m in doc["sweep"] if m["hidden"] == hidden], kernel).get(hidden)
            if ranges:
                chosen[kernel] = ranges
                doc["ranges"].setdefault(kernel, {})[str(hidden)] = [[b, list(launch)] for b, launch in ranges]
        if cfg.compare:
            for kind in cfg.kinds:
                bench.compare(kind, hidden, chosen.get("moe_finalize" if KINDS[kind].moe else "epilogue"))
        table = launch_table.Table(tuple(launch_ranges.entries(doc)), "arfuse bench --epilogue")
        doc["launch_table"] = launch_table.to_json(table)
        on_update(doc)
    doc["index_guard"] = bench.guard.message()  # random indices are all in range: must stay None
    return doc


def command(hidden: Optional[Tuple[int, ...]], tokens: Optional[Tuple[int, ...]], dtype: str,
            json_path: Optional[str], warmup: int, replays: int, progress: bool = True,
            kinds: Optional[Tuple[str, ...]] = None, table_path: Optional[str] = None) -> int:
    """``arfuse bench --epilogue``: run, print the tables, write ``json_path`` (after every hidden size too) and
    the chosen launch table to ``table_path``; ``kinds``: the kinds to time (default: all of ``KINDS``).
    Returns the exit code: 1 if a launch FAILED its check, 2 without a CUDA device, else 0."""
    import json
    import sys
    from pathlib import Path

    from arfuse.bench import epilogue_report

    if not torch.cuda.is_available():
        print("arfuse bench --epilogue: needs a CUDA device", file=sys.stderr)
        return 2
    kinds = tuple(kinds or KINDS)
    cfg = EpilogueConfig(hidden=tuple(hidden or DEFAULT_HIDDEN), tokens=tuple(tokens or DEFAULT_TOKENS), kinds=kinds,
                         sweep_kinds=tuple(k for k in SWEEP_KINDS if k in kinds),
                         dtype=getattr(torch, dtype), timing=TimingConfig(calls_per_graph=20, warmup=warmup,
                                                                          replays=replays))

    def save(doc):
        for path, data in ((json_path, doc), (table_path, doc.get("launch_table"))):
            if path and data is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")

    report = (lambda s: print(f"\r{s:<80}", end="", file=sys.stderr)) if progress else (lambda s: None)
    doc = run(cfg, "cuda", progress=report, on_update=save)
    if progress:
        print(file=sys.stderr)
    save(doc)
    epilogue_report.print_report(doc)
    for path, what in ((json_path, "the results"), (table_path, "the launch table")):
        if path:
            print(f"arfuse bench --epilogue: wrote {what} to {path}")
    return 1 if doc["failed"] else 0
