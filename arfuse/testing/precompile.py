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

from arfuse.testing.symm_checks import Point


def _job(points: List[Point]) -> Tuple[int, float, str]:
    """Compile every rank's kernel of ``points`` (one group) in this worker; (points, seconds, error or '')."""
    import torch

    from arfuse.testing.symm_checks import build_calls, case_of
    from arfuse.testing.virtual_ranks import VirtualRanks

    start = time.perf_counter()
    first = points[0]
    try:
        vr = VirtualRanks(first.world, max(p.tokens for p in points), first.hidden, first.dtype, "cuda")
        for p in points:
            calls, _, _ = build_calls(vr, p, case_of(p, 0, vr.device))
            vr.compile(p.variant, p.spec, calls)
        vr.close()
        torch.cuda.empty_cache()
    except Exception as e:  # report it; the checking process compiles what is missing and fails the point itself
        return len(points), time.perf_counter() - start, f"{type(e).__name__}: {e}"
    return len(points), time.perf_counter() - start, ""


def groups(points: Sequence[Point]) -> List[List[Point]]:
    """The points by (variant, spec, world, hidden, dtype), largest world first (the longest jobs start first)."""
    by: Dict[tuple, List[Point]] = defaultdict(list)
    for p in points:
        by[(p.variant, p.spec, p.world, p.hidden, p.dtype)].append(p)
    return sorted(by.values(), key=lambda g: -g[0].world)


def precompile(points: Sequence[Point], workers: int, progress=None) -> dict:
    """Compile ``points``' kernels in ``workers`` processes; returns {jobs, seconds, errors}. ``progress``: called
    with the number of points each finished job covered."""
    jobs = groups(points)
    start = time.perf_counter()
    errors = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for n, _, error in pool.imap_unordered(_job, jobs):
            if error:
                errors.append(error)
                print(f"precompile: {error}", file=sys.stderr)
            if progress is not None:
                progress(n)
    return {"jobs": len(jobs), "workers": workers, "seconds": round(time.perf_counter() - start, 1),
            "errors": errors}
