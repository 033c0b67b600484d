"""The reference path over gloo at group sizes 1 to 4.

Every op (object, functional and module forms; in-place residual; caller-provided outputs) is checked against
the float64 oracle on fresh random inputs per rank, outputs bitwise identical across ranks, and the counters
count what ran. Fallback and strict mode behave the same on every rank. Then ``arfuse demo`` end to end.

One launch of 4 processes covers the sizes: the matrix runs on the groups (0,), (0,1), (0,1,2), (1,3) and on the
default group of all 4 (``group=None``, with fp16 too), then fallback/strict on the default group. The demo is a
second launch of 2.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from tests._ranks import (OBJECT_CALLS_PER_EXERCISE, RECORDS_PER_EXERCISE, SMALL, Record, SmallOnly, check_records,
                          exercise, launch)

import arfuse
from arfuse import functional as F
from arfuse.backends.base import register, unregister
from arfuse.cli import demo
from arfuse.cli.main import main as cli_main
from arfuse.verify import TOLERANCE, Case, reference, rel_err

GROUPS = ((0,), (0, 1), (0, 1, 2), (1, 3))  # plus the default group of all 4 ranks
WORLD = 4
TOKENS = (1, 7, 32)
MAX_TOKENS = 32
HIDDEN = 96


def _matrix(rank, world, group, seed, dtypes):
    """The op matrix for each dtype on one group; returns (records, problems)."""
    records, problems = [], []
    for d, dtype in enumerate(dtypes):
        with arfuse.AllReduceFusion(group, max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=dtype,
                                    device="cpu") as fusion:
            if fusion.caps.world_size != world:
                problems.append(f"caps.world_size {fusion.caps.world_size} != {world}")
            for i, tokens in enumerate(TOKENS):
                records += exercise(fusion, Case(tokens, HIDDEN, dtype, seed + 10 * d + i), rank, world, group)
            stats = fusion.stats()
        expected = {"torch_ref": OBJECT_CALLS_PER_EXERCISE * len(TOKENS)}
        if stats["calls"] != expected or stats["fallbacks"] or stats["errors"]:
            problems.append(f"{dtype} counters {dict(stats)}, expected calls {expected} and nothing else")
    F.close_all(group)
    return records, problems


def _matrix_on_groups(rank, world):
    groups = [dist.new_group(list(g)) for g in GROUPS]  # collective: every rank creates every group, in order
    results = {}
    for g, (ranks, group) in enumerate(zip(GROUPS, groups)):
        if rank in ranks:
            results[ranks] = _matrix(dist.get_rank(group), len(ranks), group, 1000 * g,
                                     (torch.float32, torch.bfloat16))
    results["default"] = _matrix(rank, world, None, 50_000, (torch.float32, torch.bfloat16, torch.float16))
    results.update(_fallbacks(rank, world))
    return results




def _call_checked(fusion, tokens, seed, rank, world):
    case = Case(tokens, HIDDEN, torch.float32, seed)
    norm, res = fusion.residual_rmsnorm(case.x(rank), case.residual(), case.weight(), case.eps)
    ref_norm, ref_res = reference(case, world, arfuse.Pattern.RESIDUAL_RMSNORM)
    return max(rel_err(norm, ref_norm), rel_err(res, ref_res))


def _strict_outcome(fusion, tokens, rank, world):
    t0 = time.monotonic()
    try:
        _call_checked(fusion, tokens, 7, rank, world)
    except arfuse.FallbackError as e:
        return "FallbackError", e.backend, e.reason, time.monotonic() - t0
    return "no error", None, None, time.monotonic() - t0


def _fallbacks(rank, world):
    out = {}
    register(SmallOnly())
    try:
        opts = dict(max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=torch.float32, device="cpu")
        with arfuse.AllReduceFusion(backend="test_small_only", strict=False, **opts) as named:
            errs = [_call_checked(named, n, 100 + n, rank, world) for n in (4, 20, 20, SMALL, SMALL + 1)]
            out["named"] = (errs, named.stats())
        with arfuse.AllReduceFusion(backend="test_small_only", strict=True, **opts) as strict_obj:
            refused = _strict_outcome(strict_obj, 20, rank, world)
            after = _call_checked(strict_obj, 4, 200, rank, world)  # the group is still in step
            out["strict"] = (refused, after, strict_obj.stats())
        with arfuse.strict(True):
            with arfuse.AllReduceFusion(backend="test_small_only", **opts) as global_strict:
                out["global_strict"] = _strict_outcome(global_strict, 20, rank, world)
            with arfuse.AllReduceFusion(backend="auto", **opts) as auto:
                errs = [_call_checked(auto, n, 300 + n, rank, world) for n in (4, 20)]
                out["auto"] = (errs, auto.stats(), auto.plan("residual_rmsnorm", 20))
    finally:
        unregister(SmallOnly.name)
    return out


@pytest.fixture(scope="module")
def on_groups():
    return launch(_matrix_on_groups, WORLD)


@pytest.mark.parametrize("ranks", GROUPS, ids=lambda r: "ranks" + "-".join(map(str, r)))
def test_every_op_matches_reference_and_ranks_agree(on_groups, ranks):
    per_rank = [on_groups[r][ranks] for r in ranks]
    for r, (_, problems) in zip(ranks, per_rank):
        assert not problems, f"rank {r}: {problems}"
    checked = check_records([records for records, _ in per_rank], f"group {ranks}")
    assert checked == 2 * len(TOKENS) * RECORDS_PER_EXERCISE


def test_default_group_all_dtypes(on_groups):
    per_rank = [o["default"] for o in on_groups]
    assert not any(problems for _, problems in per_rank), [p for _, p in per_rank]
    assert check_records([records for records, _ in per_rank], "default group") == 3 * len(TOKENS) * RECORDS_PER_EXERCISE


def test_named_backend_falls_back_per_size_and_counts(on_groups):
    for rank, o in enumerate(on_groups):
        errs, stats = o["named"]
        assert max(errs) <= TOLERANCE[torch.float32], (rank, errs)
        assert stats["calls"] == {"test_small_only": 2, "torch_ref": 3}, (rank, stats)
        (reason, n), = stats["fallbacks"].items()
        assert n == 3 and "test cap" in reason, (rank, stats)
    assert all(o["named"][1] == on_groups[0]["named"][1] for o in on_groups)


def test_strict_raises_on_every_rank_before_the_collective(on_groups):
    for rank, o in enumerate(on_groups):
        (kind, backend, reason, elapsed), after, stats = o["strict"]
        assert (kind, backend) == ("FallbackError", "test_small_only"), (rank, o["strict"])
        assert f"test cap: more than {SMALL} tokens" in reason
        assert elapsed < 5.0
        assert after <= TOLERANCE[torch.float32]
        assert stats["calls"] == {"test_small_only": 1} and not stats["fallbacks"], (rank, stats)
        assert o["global_strict"][:2] == ("FallbackError", "test_small_only"), (rank, o["global_strict"])


def test_auto_prefers_capable_backend_without_counting_a_fallback(on_groups):
    for rank, o in enumerate(on_groups):
        errs, stats, plan_20 = o["auto"]
        assert max(errs) <= TOLERANCE[torch.float32]
        assert stats["calls"] == {"test_small_only": 1, "torch_ref": 1}, (rank, stats)
        assert not stats["fallbacks"]
        assert plan_20.backend == "torch_ref" and not plan_20.fallback


# -- the demo ------------------------------------------------------------------------------------------------------

def test_demo_runs_and_every_check_passes(capfd):
    rc = cli_main(["demo", "--ranks", "2", "--hidden", "128", "--tokens", "1,5,33", "--iters", "2"])
    out, err = capfd.readouterr()
    assert rc == 0, out
    # progress on stderr before the ranks start and while rank 0 checks each pattern and size
    assert err.startswith("arfuse demo: starting 2 cpu ranks (gloo)"), err[:200]
    assert "rank 0 of 2: residual_rmsnorm_fp8, 33 tokens" in err and "rank 0 of 2" not in out
    assert f"all {3 * len(demo.PATTERNS)} checks passed" in out
    for pattern in demo.PATTERNS:
        assert pattern in out
    assert "torch_ref" in out and "FAIL" not in out


def _row(digest="d", err=1e-3, path="torch_ref", residual=1e-3):
    return demo.RankRow(3, "residual_rmsnorm", path, err, residual, 1e-2, digest, 10.0)


@pytest.mark.parametrize("rows, problem", [
    ([_row(), _row()], None),
    ([_row(), _row(digest="other")], "outputs differ across ranks"),
    ([_row(), _row(err=float("inf"))], "output error"),
    ([_row(residual=0.5), _row()], "residual error"),
    ([_row(), _row(path="nccl")], "different paths"),
    ([_row(path="none"), _row(path="none")], "no call"),
])
def test_demo_combines_ranks_and_flags_each_failure(rows, problem):
    row = demo._combine(rows)
    assert (row.problem is None) if problem is None else (problem in row.problem), row
    config = demo.DemoConfig("cpu", (3,), 8, "float32", "auto", 1)
    assert demo._report(config, 2, [row], {"calls": {}, "fallbacks": {}}, True) == (0 if problem is None else 1)


def test_demo_fails_when_rank_counters_differ():
    config = demo.DemoConfig("cpu", (3,), 8, "float32", "auto", 1)
    assert demo._report(config, 2, [demo._combine([_row(), _row()])], {}, False) == 1


def test_records_flag_nan_and_excess_error():
    assert Record("x", {"out": float("nan")}, 1e-2, "d", []).failures()
    assert Record("x", {"out": 2e-2}, 1e-2, "d", []).failures()
    assert not Record("x", {"out": 5e-3}, 1e-2, "d", []).failures()


def _strict_differs(rank, world):
    try:
        arfuse.AllReduceFusion(max_tokens=4, hidden_size=16, dtype=torch.float32, device="cpu", strict=rank == 1)
    except ValueError as e:
        return str(e)
    return None


def test_strict_mode_differing_across_ranks_is_refused_on_every_rank():
    out = launch(_strict_differs, 2)
    assert all(msg and "strict mode differs across ranks [False, True]" in msg for msg in out), out
