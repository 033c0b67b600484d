"""Eager cost of the public ops before and after a change, in one process: the package at ``BASE`` (a copy of an
older arfuse renamed ``arfuse_base``, its ``torch.library`` namespace too) beside the installed ``arfuse``, with
``F.rms_norm`` of the same input as the anchor, every call timed in turn in each round (min over rounds).

Make the copy (e.g. of ba3d756): ``git archive ba3d756 arfuse | tar -x -C /tmp/ab && mv /tmp/ab/arfuse
/tmp/ab/arfuse_base`` and rename its imports and op namespace (``arfuse.`` -> ``arfuse_base.``, ``"arfuse::"`` ->
``"arfuse_base::"``, ``import arfuse`` -> ``import arfuse_base as arfuse``); then
``PYTHONPATH=/tmp/ab python bench/host_ab.py --hidden 8192 --json out.json``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def calls(mod, h: int, n: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(n, h, generator=g).to(dtype), torch.randn(n, h, generator=g).to(dtype)
    w = torch.ones(h, dtype=dtype)
    f = mod.AllReduceFusion(max_tokens=16, hidden_size=h, dtype=dtype, device="cpu")
    module = mod.FusedAddRMSNorm(h, 1e-6, fusion=f)
    module.weight.requires_grad_(False)
    own = r.clone()
    norm_out, res_out = torch.empty_like(x), torch.empty_like(x)
    rows, top_k = n * 2, 2
    experts = torch.randn(rows, h, generator=g).to(dtype)
    idx = torch.randperm(rows, generator=g).reshape(n, top_k).to(torch.int32)
    escales = torch.rand(n, top_k, generator=g)
    op = getattr(torch.ops, mod.__name__).fused_
    out, ro = torch.empty_like(x), torch.empty_like(x)
    return {
        "residual_rmsnorm": lambda: f.residual_rmsnorm(x, r, w, 1e-6),
        "residual_rmsnorm out=": lambda: f.residual_rmsnorm(x, r, w, 1e-6, norm_out=norm_out, residual_out=res_out),
        "residual_rmsnorm inplace": lambda: f.residual_rmsnorm(x, own, w, 1e-6, inplace=True),
        "rmsnorm": lambda: f.rmsnorm(x, w, 1e-6),
        "all_reduce": lambda: f.all_reduce(x),
        "residual_rmsnorm_fp8": lambda: f.residual_rmsnorm_fp8(x, r, w, 0.05, 1e-6),
        "residual_rmsnorm_quant per-token": lambda: f.residual_rmsnorm_quant(x, r, w, quant=mod.FP8PerToken()),
        "moe_finalize_residual_rmsnorm": lambda: f.moe_finalize_residual_rmsnorm(experts, idx, escales, r, w),
        "FusedAddRMSNorm.forward": lambda: module(x, r),
        "functional.residual_rmsnorm": lambda: mod.residual_rmsnorm(x, r, w, 1e-6),
        "traced op (eager dispatch)": lambda: op(x, r, w, None, None, None, None, 1e-6, 0.0, f._handle, 3, out, ro,
                                               None, None),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import arfuse
    import arfuse_base

    torch.set_num_threads(1)
    dtype = torch.bfloat16
    x = torch.randn(a.tokens, a.hidden).to(dtype)
    w = torch.ones(a.hidden, dtype=dtype)
    fns = {("anchor", "F.rms_norm"): lambda: F.rms_norm(x, (a.hidden,), w, 1e-6)}
    for label, mod in (("before", arfuse_base), ("after", arfuse)):
        fns.update({(label, k): fn for k, fn in calls(mod, a.hidden, a.tokens, dtype).items()})
    best = {k: float("inf") for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(50):
                fn()
        for _ in range(a.rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter_ns()
                for _ in range(a.calls):
                    fn()
                best[k] = min(best[k], (time.perf_counter_ns() - t0) / a.calls / 1e3)
    anchor = best[("anchor", "F.rms_norm")]
    names = [k for (label, k) in fns if label == "after"]
    print(f"hidden {a.hidden}, {a.tokens} tokens, bf16, CPU, 1 thread: µs per call (min of {a.rounds} rounds of "
          f"{a.calls}); F.rms_norm {anchor:.1f} µs")
    print(f"{'call':36s} {'before':>8s} {'after':>8s} {'before/anchor':>14s} {'after/anchor':>13s}")
    for k in names:
        b, n = best[("before", k)], best[("after", k)]
        print(f"{k:36s} {b:8.1f} {n:8.1f} {b / anchor:13.2f}x {n / anchor:12.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "anchor_us": anchor,
                       "us": {f"{label}/{k}": v for (label, k), v in best.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
