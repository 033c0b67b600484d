"""``arfuse bench --host``: what one eager call costs the host, per public op and spec kind, per backend that runs
here, next to one aten op of the same size timed in the same rounds (the anchor, ``F.rms_norm``), the bare work of
the same backend and the unfused torch a user would write.

Method (:mod:`arfuse.bench.host_timing`): back-to-back calls with the same inputs, the calls of a case timed in
turn in each round; a figure is the median over the rounds (``min_us``: the fastest round), ``overhead`` the
median of the per-round differences arfuse - bare. World sizes above 1 take the slowest rank. The calls
(:mod:`arfuse.bench.host_calls`): ``bare`` is what the backend itself does with every argument prepared
(``torch_ref``'s torch calls, the ``nccl`` path's kernel launches through Triton's ``kernel[grid](...)``, and
``bare_direct``: the same compiled kernels straight through their launcher, the floor any Python caller has);
``unfused`` is clone + ``dist.all_reduce`` + the torch ops of an HF-style RMSNorm (and quantization).

Targets: arfuse at most 1.7x the bare launch on GPUs and at most 10 µs over ``torch_ref``'s own torch calls on CPU
(issue 14); against the anchor (issue 23, judged on the fastest rounds) the public ``residual_rmsnorm`` allocating
its outputs at most 1.5x, every other public op, ``FusedAddRMSNorm.forward`` and the traced op at most 2x.
``--profile`` (:mod:`arfuse.bench.host_profile`) says where each call's microseconds go; the stubbed table
(:mod:`arfuse.bench.host_stubbed`) times the GPU backends' launch paths on the CPU. The document and the tables:
:mod:`arfuse.bench.host_report`.

CPU timings on a shared host are indicative (the rounds' spread is in the JSON); at world size 2 on a few cores
gloo's own latency and the ranks' scheduling dominate, so compare overheads at world size 1.
"""
from __future__ import annotations

from typing import List

import torch

import arfuse
from arfuse import functional as F
from arfuse.backends import base
from arfuse.bench.host_calls import anchor_call, arfuse_call, bare_calls, unfused_call
from arfuse.bench.host_cases import Case, HostConfig, Inputs, cases
from arfuse.bench.host_profile import profile_call, scaled
from arfuse.bench.host_timing import summarize, time_rounds
from arfuse.core.spec import FusionSpec
from arfuse.probe import vote


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
           "fallback": plan.reason if plan.fallback else None, "anchor_target": case.anchor_target}
    fns = {"arfuse": arfuse_call(case, fusion, inp, group, backend), "anchor": anchor_call(inp)}
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
