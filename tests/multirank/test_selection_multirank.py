"""Selection across ranks over gloo: every rank reaches the same decision for every shape and token count,
with a tuned table file read by all ranks; ranks whose tables differ still agree (rank 0's entry, counted);
ranks on simulated different hosts get ``GroupCaps.single_host`` False with a note naming the hosts, and never
an intra-node path. Each chosen path runs and matches the float64 reference.

Two launches: 3 ranks on one host sharing a tuned table; 2 ranks on "hostA"/"hostB" with different tables.
"""
from __future__ import annotations

import json

import pytest
import torch
from tests._ranks import launch

import arfuse
from arfuse.backends.base import Support, register, unregister
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.launch import run_ranks
from arfuse.select import table
from arfuse.verify import TOLERANCE, Case, digest, reference, rel_err

TUNED_HIDDEN = 96
SHAPES = [(64, "float32", 40), (TUNED_HIDDEN, "float32", 300), (2 * TUNED_HIDDEN, "float32", 300),
          (TUNED_HIDDEN, "bfloat16", 120), (256, "bfloat16", 17)]
CHECK_TOKENS = (1, 8, 9, 17, 101)


class FakeIntra(TorchRefBackend):
    """The reference math under another name: an 'intra-node' path (multi_host False), 'tiny' up to 16 tokens."""

    name = "fake_intra"
    variants = ("tiny", "wide")
    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.bfloat16}))
    priority = 5
    multi_host = False

    def check_variant(self, problem, caps, variant):
        return "tiny is limited to 16 tokens" if variant == "tiny" and problem.num_tokens > 16 else None


def _entry(world, ranges, hidden=TUNED_HIDDEN):
    return {"gpu": "cpu", "world_size": world, "dtype": "float32", "hidden_size": hidden, "ranges": ranges}


def _write(path, *entries):
    path.write_text(json.dumps({"format": table.FORMAT, "version": table.VERSION, "entries": list(entries)}))
    return str(path)


def _decide_and_run(rank, world, table_path):
    """Every plan of every shape, plus checked calls at a few sizes; returns what the parent compares."""
    register(FakeIntra())
    try:
        out = {"plans": {}, "errors": [], "digests": [], "stats": {}, "caps": None}
        for hidden, dtype_name, top in SHAPES:
            dtype = getattr(torch, dtype_name)
            with arfuse.AllReduceFusion(max_tokens=top, hidden_size=hidden, dtype=dtype, device="cpu",
                                        table_path=table_path) as fusion:
                out["caps"] = (fusion.caps.single_host, fusion.caps.notes)
                out["plans"][(hidden, dtype_name, top)] = [
                    [(p.key, p.reason, p.fallback) for p in (fusion.plan(pattern, n) for n in range(1, top + 1))]
                    for pattern in arfuse.Pattern]
                for n in (t for t in CHECK_TOKENS if t <= top):
                    case = Case(n, hidden, dtype, seed=hidden * 1000 + n)
                    norm, res = fusion.residual_rmsnorm(case.x(rank), case.residual(), case.weight(), case.eps)
                    ref_norm, ref_res = reference(case, world, arfuse.Pattern.RESIDUAL_RMSNORM)
                    out["errors"].append((hidden, dtype_name, n, max(rel_err(norm, ref_norm), rel_err(res, ref_res)),
                                          TOLERANCE[dtype]))
                    out["digests"].append(digest(norm, res))
                out["stats"][(hidden, dtype_name, top)] = fusion.stats()
        return out
    finally:
        unregister(FakeIntra.name)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "tune.json"
    _write(path, _entry(3, [{"max_tokens": 8, "backend": "fake_intra", "variant": "tiny"},
                            {"max_tokens": 100, "backend": "torch_ref"},
                            {"max_tokens": None, "backend": "fake_intra", "variant": "wide"}]))
    return launch(_decide_and_run, 3, str(path))


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    d = tmp_path_factory.mktemp("hosts")
    prefers_intra = _write(d / "a.json", _entry(2, [{"max_tokens": None, "backend": "fake_intra", "variant": "wide",
                                                    "alternatives": ["torch_ref"]}]))
    plain = _write(d / "b.json", _entry(2, [{"max_tokens": None, "backend": "torch_ref"}]))
    rank_env = [{"ARFUSE_HOSTNAME": "hostA", "ARFUSE_TUNE_FILE": prefers_intra},
                {"ARFUSE_HOSTNAME": "hostB", "ARFUSE_TUNE_FILE": plain}]
    return run_ranks(_decide_and_run, 2, None, device="cpu", timeout_s=240, rank_env=rank_env)


def _check_runs(results):
    for rank, o in enumerate(results):
        bad = [e for e in o["errors"] if not e[3] <= e[4]]
        assert not bad, f"rank {rank}: {bad}"
    assert all(o["digests"] == results[0]["digests"] for o in results), "outputs differ across ranks"


def test_every_rank_decides_alike_for_every_shape(one_host):
    first = one_host[0]["plans"]
    assert len(first) == len(SHAPES)
    for rank, o in enumerate(one_host[1:], 1):
        for shape, plans in o["plans"].items():
            assert plans == first[shape], f"rank {rank} decided differently for {shape}"
    _check_runs(one_host)


def test_tuned_table_read_by_all_ranks_decides(one_host):
    plans = one_host[0]["plans"][(TUNED_HIDDEN, "float32", 300)][arfuse.Pattern.RESIDUAL_RMSNORM]
    keys = [p[0] for p in plans]
    assert keys[:8] == ["fake_intra/tiny"] * 8
    assert keys[8:100] == ["torch_ref"] * 92
    assert keys[100:] == ["fake_intra/wide"] * 200
    assert all(p[1].startswith("tuned choice 1") for p in plans)
    # no bfloat16 entry: priority order (fake_intra is first by priority, tiny up to 16 tokens)
    keys = [p[0] for p in one_host[0]["plans"][(TUNED_HIDDEN, "bfloat16", 120)][arfuse.Pattern.RESIDUAL_RMSNORM]]
    assert keys[:16] == ["fake_intra/tiny"] * 16 and set(keys[16:]) == {"fake_intra/wide"}
    # hidden 192 and 64 have no entry of their own: the hidden-96 entry applies with bounds kept in bytes
    scaled = one_host[0]["plans"][(2 * TUNED_HIDDEN, "float32", 300)][arfuse.Pattern.RESIDUAL_RMSNORM]
    assert [p[0] for p in scaled[:5]] == ["fake_intra/tiny"] * 4 + ["torch_ref"]
    assert scaled[49][0] == "torch_ref" and scaled[50][0] == "fake_intra/wide"
    assert scaled[0][1].startswith("tuned (scaled from hidden 96) choice 1")
    narrow = one_host[0]["plans"][(64, "float32", 40)][arfuse.Pattern.RESIDUAL_RMSNORM]
    assert [p[0] for p in narrow] == ["fake_intra/tiny"] * 12 + ["torch_ref"] * 28
    stats = one_host[0]["stats"][(TUNED_HIDDEN, "float32", 300)]
    assert stats["calls"] == {"fake_intra/tiny": 2, "torch_ref": 2, "fake_intra/wide": 1}, stats
    assert not stats["fallbacks"]


def test_simulated_hosts_are_detected_and_named(two_hosts):
    for rank, o in enumerate(two_hosts):
        single_host, notes = o["caps"]
        assert single_host is False
        note = next(n for n in notes if n.startswith("single_host"))
        assert "hostA" in note and "hostB" in note, notes


def test_two_hosts_never_run_an_intra_node_path_and_agree_despite_different_tables(two_hosts):
    for shape in two_hosts[0]["plans"]:
        assert two_hosts[1]["plans"][shape] == two_hosts[0]["plans"][shape], shape
        for pattern_plans in two_hosts[0]["plans"][shape]:
            assert {p[0] for p in pattern_plans} == {"torch_ref"}, shape
    tuned = two_hosts[1]["plans"][(TUNED_HIDDEN, "float32", 300)][arfuse.Pattern.RESIDUAL_RMSNORM]
    # rank 1's own file names torch_ref first; "choice 2" shows it used rank 0's entry, whose first choice
    # (fake_intra/wide) the multi-host rule refused
    assert all(p[1].startswith("tuned choice 2 (skipped fake_intra/wide: multi-host group") for p in tuned)
    for rank, o in enumerate(two_hosts):
        stats = o["stats"][(TUNED_HIDDEN, "float32", 300)]
        reasons = " | ".join(stats["fallbacks"])
        assert "multi-host group" in reasons and "hostA" in reasons, (rank, stats)
        assert "selection table differs on ranks [1]" in reasons, (rank, stats)
        assert set(stats["calls"]) == {"torch_ref"}, (rank, stats)
        other = o["stats"][(TUNED_HIDDEN, "bfloat16", 120)]
        assert not any("differs" in r for r in other["fallbacks"]), other  # no bfloat16 entry on either rank
    _check_runs(two_hosts)
