"""The verification run of the ``triton_symm`` kernels on virtual ranks, and the evidence it hands to the
verification record (:mod:`arfuse.backends.verification`).

:func:`run` checks a plan's points (:mod:`arfuse.testing.symm_checks`) plus its timeout and CUDA-graph checks and
returns the results with what ran where: the device, torch and Triton versions, the commit (``ARFUSE_COMMIT``, or
git), and the source fingerprint of every path and component as the run saw it. :func:`evidence` turns results
into evidence entries: a variant is vouched for only if every one of its timeout and graph checks passed and at
least one of its points did, and then for each feature whose every point passed.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from arfuse.backends import verification
from arfuse.backends.base import get
from arfuse.core import settings, spec as S
from arfuse.testing import symm_checks as checks
from arfuse.testing.virtual_ranks import BACKEND

COVER = (  # every feature, each quantization with and without the MoE prologue, in 10 specs
    S.ALLREDUCE, S.FusionSpec(residual=False, weight_offset=True), S.RESIDUAL_RMSNORM,
    S.FusionSpec(quant=S.Quant.FP8_STATIC, also_norm=True),
    S.FusionSpec(weight_offset=True, quant=S.Quant.FP8_PER_TOKEN, scale_layout=S.ScaleLayout.FP32),
    S.FusionSpec(quant=S.Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=S.ScaleLayout.FP32, also_norm=True),
    S.FusionSpec(weight_offset=True, quant=S.Quant.FP8_PER_TOKEN_GROUP, group_size=128,
                 scale_layout=S.ScaleLayout.UE8M0),
    S.FusionSpec(prologue=S.Prologue.MOE_FINALIZE),
    S.FusionSpec(prologue=S.Prologue.MOE_FINALIZE, shared_expert=True, quant=S.Quant.FP8_PER_TOKEN,
                 scale_layout=S.ScaleLayout.FP32, also_norm=True),
    S.FusionSpec(prologue=S.Prologue.MOE_FINALIZE, shared_expert=True, weight_offset=True, also_norm=True,
                 quant=S.Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=S.ScaleLayout.UE8M0),
)
TOKENS = (1, 3, 17, 128, 1000, 2048)
WORLDS = (2, 4, 8)
# A plan is a list of tiers, most important first; a run with a deadline stops between points and says so.
PLANS = {
    "smoke": [dict(worlds=WORLDS, hiddens=(7168,), tokens=(1, 17, 128, 1000), specs=(COVER[2], COVER[9]))],
    # what fits a short device call: every world size on specs covering most features, then every spec at 2 ranks
    "essential": [
        dict(name="every world size", worlds=WORLDS, hiddens=(7168,), tokens=TOKENS,
             specs=(COVER[0], COVER[2], COVER[6], COVER[9])),
        dict(name="the whole catalogue at 2 ranks", worlds=(2,), hiddens=(7168,), tokens=TOKENS, specs=None),
        dict(name="hidden sizes", worlds=WORLDS, hiddens=(4096, 8192), tokens=(1, 17, 1000, 2048),
             specs=(COVER[2],), modes=False),
    ],
    "full": [
        dict(name="every feature, every world size", worlds=WORLDS, hiddens=(7168,), tokens=TOKENS, specs=COVER),
        dict(name="hidden sizes", worlds=WORLDS, hiddens=(4096, 5120, 8192), tokens=TOKENS,
             specs=(COVER[2], COVER[9])),
        dict(name="the whole catalogue", worlds=(2,), hiddens=(7168,), tokens=TOKENS, specs=None),
        dict(name="fp16 and fp32", worlds=WORLDS, hiddens=(8192,), tokens=(1, 17, 1000), specs=(COVER[2],),
             dtypes=(torch.float16, torch.float32), modes=False),
        dict(name="the whole catalogue at 8 ranks", worlds=(8,), hiddens=(7168,), tokens=(3, 1000), specs=None,
             modes=False),
    ],
}
PROTOCOL = dict(hidden=7168, timeout_tokens=16, graph_tokens=17)  # shapes the first tiers already compiled
# the protocol checks on their own (a part of a plan run over several device calls): their shapes compiled first
PLANS["protocol"] = [dict(name="the protocol checks' shapes", worlds=WORLDS, hiddens=(PROTOCOL["hidden"],),
                          tokens=(PROTOCOL["timeout_tokens"], PROTOCOL["graph_tokens"]), specs=(S.RESIDUAL_RMSNORM,),
                          modes=False)]


def environment(device) -> dict:
    """What ran where: date, device, versions, commit."""
    dev = torch.device(device)
    info = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                commit=settings.text("ARFUSE_COMMIT") or _git_commit())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(__file__))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def fingerprints() -> Dict[str, str]:
    """The source fingerprint of every ``triton_symm`` path and of every component, as this process sees them."""
    backend = get(BACKEND)
    found = {f"{backend.name}/{v}": verification.fingerprint(backend.verified_sources(v))[0] for v in checks.VARIANTS}
    for name in verification.COMPONENTS:
        found[name] = verification.component_verdict(name).sources
    return found


def tiers(name: str) -> List[List[checks.Point]]:
    """The points of plan ``name`` (:data:`PLANS`), tier by tier."""
    found = []
    for t in PLANS[name]:
        found.append(checks.matrix(t["worlds"], t["hiddens"], t["tokens"], t["specs"],
                                   t.get("dtypes", (torch.bfloat16,)), modes=t.get("modes", True)))
    return found


def protocol_checks(worlds: Sequence[int] = WORLDS, replays: int = 1000) -> dict:
    """The timeout check (timeout 1 s) and the graph check of every variant at each world size."""
    timeouts = [dict(world=w, variant=v, hidden=PROTOCOL["hidden"], dtype=torch.bfloat16, timeout_s=1.0,
                     tokens=PROTOCOL["timeout_tokens"]) for w in worlds for v in checks.VARIANTS]
    graphs = [dict(world=w, variant=v, spec=S.RESIDUAL_RMSNORM, hidden=PROTOCOL["hidden"],
                   tokens=PROTOCOL["graph_tokens"], dtype=torch.bfloat16, replays=replays)
              for w in worlds for v in checks.VARIANTS]
    return dict(timeouts=timeouts, graphs=graphs)


def run(tiers_: Sequence[Sequence[checks.Point]], device, protocol: Optional[dict] = None, workers: int = 0,
        progress: Optional[Callable[[str, int], None]] = None, seed: int = 0, deadline_s: float = float("inf"),
        protocol_after: int = 1) -> dict:
    """Check the points tier by tier (each tier compiled first in ``workers`` processes when > 0; grouped by world
    size, hidden and dtype, one set of virtual ranks each), and the protocol checks (:func:`protocol_checks`)
    after tier ``protocol_after``. Stops starting work ``deadline_s`` seconds after the start and records what
    was left out (``skipped``). ``progress(stage, n)`` is called as work completes."""
    tick = progress or (lambda stage, n: None)
    start = time.perf_counter()
    left = lambda: deadline_s - (time.perf_counter() - start)  # noqa: E731
    results = dict(environment=environment(device), fingerprints=fingerprints(), points=[], timeouts=[], graphs=[],
                   precompile=[], skipped=[])
    protocol = protocol or dict(timeouts=[], graphs=[])
    for index, points in enumerate(tiers_):
        if index == protocol_after:
            _protocol(results, protocol, device, tick, left)
        if left() <= 0:
            results["skipped"].append(f"tier {index}: {len(points)} points (deadline)")
            continue
        if workers and points:
            from arfuse.testing.precompile import key, precompile

            built = precompile(points, workers, lambda n: tick("compile", n), deadline_s=left())
            done, failed = set(built.pop("done")), built.pop("failed")
            results["precompile"].append(built)
            results["points"] += [dict(p.describe(), errors={}, identical=False, ok=False, tier=index,
                                       problem=f"compile failed: {failed[key(p)]}") for p in points if key(p) in failed]
            unbuilt = sum(key(p) not in done and key(p) not in failed for p in points)
            if unbuilt:
                results["skipped"].append(f"tier {index}: {unbuilt} points not compiled by the deadline")
            points = [p for p in points if key(p) in done]
        _points(results, points, device, tick, left, seed, index)
    if protocol_after >= len(tiers_):
        _protocol(results, protocol, device, tick, left)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def _points(results, points, device, tick, left, seed, tier) -> None:
    by_shape: Dict[tuple, List[checks.Point]] = {}
    for p in points:
        by_shape.setdefault((p.world, p.hidden, p.dtype), []).append(p)
    done = 0
    for (world, hidden, dtype), group in by_shape.items():
        if left() <= 0:
            break
        size = max(p.tokens for p in group)
        vr = checks.VirtualRanks(world, size, hidden, dtype, device)
        try:
            for i, p in enumerate(group):
                if left() <= 0:
                    break
                record = dict(checks.check_point(vr, p, seed=seed + i), tier=tier)
                results["points"].append(record)
                done += 1
                tick("points", 1)
                if record["problem"] and "waited more than" in record["problem"]:
                    vr.close()  # a timed-out workspace cannot be used again
                    vr = checks.VirtualRanks(world, size, hidden, dtype, device)
        finally:
            vr.close()
    if done < len(points):
        results["skipped"].append(f"tier {tier}: {len(points) - done} of {len(points)} points (deadline)")


def _protocol(results, protocol, device, tick, left) -> None:
    for kind, check in (("timeouts", checks.check_timeout), ("graphs", checks.check_graph)):
        for kw in protocol[kind]:
            if left() <= 0:
                results["skipped"].append(f"{kind}: {kw['variant']} at {kw['world']} ranks (deadline)")
                continue
            results[kind].append(check(device=device, **kw))
            tick(kind, 1)


def evidence(results: Sequence[dict], results_dir: str, kind: str = "virtual_ranks",
             require: Sequence[str] = ("timeout", "graph")) -> Dict[str, dict]:
    """Per ``triton_symm`` path, the evidence entry ``results`` (one or more runs, or parts of one run, on the same
    code with the same torch and Triton releases) support.

    A world size counts only where a check of each kind in ``require`` ran for the path; points at other world
    sizes are left out (``gaps``), and a path with no such world size gets ``recordable=False`` (nothing to record:
    a gap is not a failure). A path is vouched for (``ok``) only if those checks passed and its points without
    features passed; then ``features`` are those of the specs whose every point passed, ``features_by_world``
    (world size -> dtype -> features) those that ran at each world size in each dtype (a plan cut by its deadline
    reaches fewer at some), and ``refused`` names each spec with a failed point (``Verdict.reason`` refuses those
    specs even where their features are vouched for by others)."""
    fps = {tuple(sorted(r["fingerprints"].items())) for r in results}
    if len(fps) != 1:
        raise ValueError("evidence: the results come from runs on different code; record each run on its own")
    for key, same in (("torch", str.__eq__), ("triton", verification.same_release)):  # Triton: per major.minor
        found = sorted({str(r["environment"].get(key)) for r in results})
        if not all(same(a, b) for a in found for b in found):
            raise ValueError(f"evidence: the results come from different {key} releases ({', '.join(found)}); "
                             f"record each on its own")
    env, prints = results[0]["environment"], results[0]["fingerprints"]
    device = ", ".join(sorted({r["environment"]["device"] for r in results}))
    entries = {}
    for variant in checks.VARIANTS:
        path = f"triton_symm/{variant}"
        protocol = [c for r in results for c in r["timeouts"] + r["graphs"] if c["variant"] == variant]
        ran = [p for r in results for p in r["points"] if p["variant"] == variant]
        lacking = {w: [k for k in require if not any(c["world"] == w and c["check"] == k for c in protocol)]
                   for w in sorted({p["world"] for p in ran})}  # world size -> the required checks it has none of
        checked = {w for w, kinds in lacking.items() if not kinds}
        gaps = [f"{sum(p['world'] == w for p in ran)} points at {w} ranks left out: no {' or '.join(kinds)} check there"
                for w, kinds in lacking.items() if kinds]
        pts = [p for p in ran if p["world"] in checked]
        worlds = sorted(checked)
        problems = [f"{c['check']} check at {c['world']} ranks failed: {c['problem']}"
                    for c in protocol if not c["ok"]]
        problems += [f"{p['spec']} failed: {p['problem']}" for p in pts if not p["features"] and not p["ok"]]
        problems += [f"{p['mode']} check ({p['spec']}) failed: {p['problem']}" for p in pts
                     if p["mode"] != "plain" and not p["ok"]]  # the mode's code path serves every spec
        specs: Dict[str, List[dict]] = {}
        for p in pts:
            specs.setdefault(p["spec"], []).append(p)
        passing = [v for v in specs.values() if all(p["ok"] for p in v)]
        refused = {name: next(p["problem"] for p in v if not p["ok"])
                   for name, v in specs.items() if not all(p["ok"] for p in v)}
        features = sorted(set().union(*(v[0]["features"] for v in passing))) if passing and not problems else []
        by_world = {str(w): {d: sorted(set().union(*(v[0]["features"] for v in passing
                                                    if any(p["world"] == w and p["dtype"] == d for p in v))))
                             for d in sorted({p["dtype"] for p in pts if p["world"] == w})}
                    for w in worlds} if features else {}
        entries[path] = dict(kind=kind, date=env["date"], device=device, torch=env["torch"],
                             triton=env["triton"], commit=env["commit"], sources=prints[path], world_sizes=worlds,
                             dtypes=sorted({p["dtype"] for p in pts}), hiddens=sorted({p["hidden"] for p in pts}),
                             cases=len(pts), passed=sum(p["ok"] for p in pts), protocol_checks=len(protocol),
                             ok=not problems, problems=problems[:10], features=features,
                             features_by_world=by_world, refused=refused, gaps=gaps,
                             recordable=bool(pts) or bool(problems), results=results_dir)
    return entries
