"""Compile the kernels of many virtual-rank check points in worker processes, so the checking process finds them in
Triton's on-disk cache instead of compiling W ranks' kernels one after another (a few seconds each).

Each worker builds the same virtual ranks and calls as :func:`arfuse.testing.symm_checks.check_point` would and
compiles through the same launchers (``VirtualRanks.compile``), so the cache holds exactly the specializations the
check launches. Points sharing (variant, spec, world, hidden, dtype) go to one worker: their kernels differ at most
in a launch constant, and the worker's own cache skips repeats.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from arfuse.core.spec import FusionSpec
from arfuse.testing.symm_checks import VARIANTS, Point


def _job(points: List[Point], device: str) -> Tuple[int, float, str]:
    """Compile every rank's kernel of ``points`` (one group) in this worker; (points, seconds, error or '')."""
    import torch

    from arfuse.testing.symm_checks import build_calls, case_of
    from arfuse.testing.virtual_ranks import VirtualRanks

    start = time.perf_counter()
    first = points[0]
    try:
        vr = VirtualRanks(first.world, max(p.tokens for p in points), first.hidden, first.dtype, device)
        for p in points:
            calls, _, _ = build_calls(vr, p, case_of(p, 0, vr.device))
            vr.compile(p.variant, p.spec, calls)
        vr.close()
        if device != "cpu":
            torch.cuda.empty_cache()
    except Exception as e:  # a worker's boundary: any failure is reported, and the run fails that group's points
        return len(points), time.perf_counter() - start, f"{type(e).__name__}: {e}"
    return len(points), time.perf_counter() - start, ""


def key(p: Point) -> tuple:
    """The group a point's kernels are compiled in."""
    return (p.variant, p.spec, p.world, p.hidden, p.dtype)


def groups(points: Sequence[Point]) -> List[List[Point]]:
    """The points by :func:`key`: the largest world size first (the longest jobs start first), then spec by spec
    in the points' order (a run cut short has whole specs compiled)."""
    by: Dict[tuple, List[Point]] = defaultdict(list)
    first: Dict[FusionSpec, int] = {}
    for i, p in enumerate(points):
        by[key(p)].append(p)
        first.setdefault(p.spec, i)
    return sorted(by.values(), key=lambda g: (-g[0].world, first[g[0].spec], VARIANTS.index(g[0].variant)))


def precompile(points: Sequence[Point], workers: int, progress=None, deadline_s: float = float("inf"),
               device: str = "cuda") -> dict:
    """Compile ``points``' kernels in ``workers`` processes, until ``deadline_s`` seconds have passed (then the
    workers are stopped). Returns {jobs, compiled, done: the group keys compiled, failed: {key: error} of the groups
    that raised, workers, seconds, errors}. ``progress``: called
    with the number of points each finished job covered."""
    jobs = groups(points)
    start = time.perf_counter()
    errors, done, failed = [], [], {}
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers)
    try:
        pending = [(key(g[0]), pool.apply_async(_job, (g, device))) for g in jobs]
        while pending and time.perf_counter() - start < deadline_s:
            still = []
            for k, res in pending:
                if not res.ready():
                    still.append((k, res))
                    continue
                n, _, error = res.get()
                if error:
                    errors.append(error)
                    failed[k] = error
                    print(f"precompile: {error}", file=sys.stderr)
                else:
                    done.append(k)
                if progress is not None:
                    progress(n)
            pending = still
            time.sleep(0.05)
    finally:
        pool.terminate()
        pool.join()
    return {"jobs": len(jobs), "compiled": len(done), "done": done, "failed": failed, "workers": workers,
            "seconds": round(time.perf_counter() - start, 1), "errors": errors}
