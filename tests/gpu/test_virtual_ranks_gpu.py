"""The ``triton_symm`` kernels on virtual ranks (W ranks on one GPU, :mod:`arfuse.testing.virtual_ranks`): every
variant at W = 2, 4 and 8 against the float64 reference, NaN-poisoned outputs, bitwise identity across ranks, in
place, the zero-copy input, a MoE index out of range, a rank skipping a call, and CUDA-graph replays with fresh
inputs. A sample of the verification run (``bench/verify_kernels.py``, which checks the whole matrix and writes the
evidence), kept small enough for the GPU test suite; its kernels are compiled in worker processes first. Needs
``CUDA_DEVICE_MAX_CONNECTIONS`` >= 9 (``bench/gpu_session.sh`` sets it). Set ARFUSE_RESULTS_DIR to keep the
figures.
"""
from __future__ import annotations

import os
from typing import Dict, List

import pytest
import torch

from arfuse.core import spec as S
from arfuse.testing import save_results
from arfuse.testing import symm_checks as checks
from arfuse.testing import verification_run as vrun

pytestmark = pytest.mark.gpu
WORLDS = (2, 4, 8)
HIDDEN = vrun.PROTOCOL["hidden"]  # the shapes of the verification run's first tier: its kernels are cached
SPECS = (S.RESIDUAL_RMSNORM, vrun.COVER[-1])  # the latter: MoE + shared expert + offset + UE8M0 groups + norm
TIMEOUT = dict(hidden=HIDDEN, dtype=torch.bfloat16, timeout_s=1.0, tokens=vrun.PROTOCOL["timeout_tokens"])
GRAPH_TOKENS = vrun.PROTOCOL["graph_tokens"]
FIGURES: Dict[str, List[dict]] = {"points": [], "timeouts": [], "graphs": []}


def _points(variant, world):
    return checks.matrix((world,), (HIDDEN,), (3, 1000), SPECS, variants=(variant,))


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Every kernel this module launches, compiled in parallel before the first test."""
    from arfuse.testing.precompile import precompile

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    points = [p for v in checks.VARIANTS for w in WORLDS for p in _points(v, w)]
    points += [checks.Point(v, S.RESIDUAL_RMSNORM, w, HIDDEN, n, torch.bfloat16, mode)
               for v in checks.VARIANTS for w in WORLDS
               for n, mode in ((TIMEOUT["tokens"], "plain"), (GRAPH_TOKENS, "inplace"))]
    figures = precompile(points, max(1, min(14, (os.cpu_count() or 2) - 2)))
    assert not figures["errors"], figures["errors"][:3]
    yield
    save_results("virtual_ranks_gpu.json", FIGURES)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", checks.VARIANTS)
def test_specs_and_modes_on_virtual_ranks(variant, world):
    points = _points(variant, world)
    vr = checks.VirtualRanks(world, max(p.tokens for p in points), HIDDEN, torch.bfloat16, "cuda")
    try:
        results = [checks.check_point(vr, p, seed=i) for i, p in enumerate(points)]
    finally:
        vr.close()
    FIGURES["points"] += results
    bad = [r for r in results if not r["ok"]]
    assert len(results) >= 4 and not bad, bad[:3]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", checks.VARIANTS)
def test_a_rank_skipping_a_call_is_named_by_every_waiting_rank(variant, world):
    result = checks.check_timeout(world, variant, device="cuda", skipped=world - 1, **TIMEOUT)
    FIGURES["timeouts"].append(result)
    assert result["ok"], result["problem"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", checks.VARIANTS)
def test_graph_replays_with_fresh_inputs(variant, world):
    result = checks.check_graph(world, variant, S.RESIDUAL_RMSNORM, HIDDEN, GRAPH_TOKENS, torch.bfloat16, "cuda",
                                replays=200)
    FIGURES["graphs"].append(result)
    assert result["ok"], result["problem"]
