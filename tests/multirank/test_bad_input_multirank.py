"""Bad input across 3 gloo ranks: the right error, raised before any collective, and no rank left hanging.

The contract. Every check a rank can make on its own arguments (dtype, device, shape, contiguity, hidden size vs
weight and capacity, max_tokens, eps, FP8 scale, caller outputs, a closed object) runs before the op's
collective, so a rank with bad input raises at once and never enters it. What needs the other ranks' arguments
is the caller's contract and is not checked: the same token count on every rank (zero tokens is a valid no-op
only if every rank passes zero), the same calls in the same order, x of the same dtype and hidden size on every
rank for the functional forms (they pick their cached object by x), and closing only after the last call. Break
it and the peers wait in the collective until the process group's timeout (or a GPU kernel's bounded peer wait).

How the test proves "before the collective" without deadlocking itself:
- all ranks pass the same bad input: each raises promptly and the fusion object counts no call;
- one rank passes bad input, the others good input: the bad rank raises, then makes the matching good call the
  others are blocked in. On one host ``time.monotonic`` is one clock, so a peer whose call returns after the
  bad rank began its matching call shows the bad call added nothing to the collective; the results are still
  exact and identical. Had the bad call entered the collective, the recovery call would find no partner and the
  launch would hit its timeout.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from tests._ranks import Good, bad_inputs, closed_calls, expect, launch

import arfuse
from arfuse import functional as F
from arfuse.core.types import Pattern
from arfuse.verify import TOLERANCE, digest, reference, rel_err

WORLD = 3
PROMPT_S = 2.0  # a local check takes microseconds; the bound only has to be far below any collective timeout
BAD = bad_inputs() + closed_calls()
CLOSED = {b.label for b in closed_calls()}


def _good_call(fusion, good, world):
    norm, res = fusion.residual_rmsnorm(good.x, good.residual, good.weight, good.case.eps)
    ref_norm, ref_res = reference(good.case, world, Pattern.RESIDUAL_RMSNORM)
    return max(rel_err(norm, ref_norm), rel_err(res, ref_res)), digest(norm, res)


def _zero_tokens(fusion):
    x, w = torch.empty(0, Good.H), torch.ones(Good.H)
    outs = [*fusion.residual_rmsnorm(x, torch.empty(0, Good.H), w), *fusion.residual_rmsnorm_fp8(x, x.clone(), w, 1.0),
            fusion.rmsnorm(x, w), fusion.all_reduce(x), *F.residual_rmsnorm(x, x.clone(), w),
            *arfuse.FusedAddRMSNorm(Good.H, fusion=fusion)(x, x.clone())]
    return [(tuple(o.shape), o.dtype) for o in outs]


def _bad_inputs_on_ranks(rank, world):
    opts = dict(max_tokens=Good.MAX, hidden_size=Good.H, dtype=torch.float32, device="cpu")
    fusion, closed = arfuse.AllReduceFusion(**opts), arfuse.AllReduceFusion(**opts)
    closed.close()
    F.residual_rmsnorm(Good(0, rank).x, Good(0).residual, Good(0).weight)  # builds the functional forms' object
    calls_before = fusion.stats()["calls"]

    all_bad = []
    for bad in BAD:
        dist.barrier()
        t0 = time.monotonic()
        verdict = expect(bad, closed if bad.label in CLOSED else fusion, Good(1, rank))
        all_bad.append((bad.label, verdict, time.monotonic() - t0))
    counted = fusion.stats()["calls"] != calls_before
    after_all_bad = _good_call(fusion, Good(2, rank), world)

    one_bad = []
    for i, bad in enumerate(BAD):
        bad_rank, good = i % world, Good(100 + i, rank)
        dist.barrier()
        verdict = raised_in = None
        if rank == bad_rank:
            t0 = time.monotonic()
            verdict = expect(bad, closed if bad.label in CLOSED else fusion, good)
            raised_in = time.monotonic() - t0
        entered = time.monotonic()
        err, dig = _good_call(fusion, good, world)
        one_bad.append(dict(label=bad.label, bad_rank=bad_rank, verdict=verdict, raised_in=raised_in,
                            entered=entered, done=time.monotonic(), err=err, digest=dig))

    zero_before = fusion.stats()["calls"]
    zero = _zero_tokens(fusion)
    zero_counted = fusion.stats()["calls"] != zero_before
    after_zero = _good_call(fusion, Good(3, rank), world)
    fusion.close()
    F.close_all()
    return dict(all_bad=all_bad, counted=counted, after_all_bad=after_all_bad, one_bad=one_bad, zero=zero,
                zero_counted=zero_counted, after_zero=after_zero)


@pytest.fixture(scope="module")
def ranks():
    return launch(_bad_inputs_on_ranks, WORLD)


def test_catalogue_covers_every_bad_input_kind():
    labels = " ".join(b.label for b in BAD)
    for kind in ("wrong dtype", "wrong device", "residual dtype mismatch", "weight dtype mismatch", "1-D", "3-D",
                 "non-contiguous", "weight size != hidden", "hidden != capacity", "more tokens than max_tokens",
                 "eps = 0", "eps < 0", "eps inf", "eps nan", "closed", "functional", "module", "fp8", "rmsnorm",
                 "all_reduce"):
        assert kind in labels, kind


def test_same_bad_input_on_every_rank_raises_promptly_and_runs_nothing(ranks):
    for rank, r in enumerate(ranks):
        wrong = [f"rank {rank}: {verdict}" for _, verdict, _ in r["all_bad"] if verdict is not None]
        assert not wrong, "\n".join(wrong)
        slow = [(label, t) for label, _, t in r["all_bad"] if t > PROMPT_S]
        assert not slow, f"rank {rank}: slow to raise: {slow}"
        assert not r["counted"], f"rank {rank}: a rejected call reached the backend"
        err, _ = r["after_all_bad"]
        assert err <= TOLERANCE[torch.float32]
    assert len({r["after_all_bad"][1] for r in ranks}) == 1


@pytest.mark.parametrize("index", range(len(BAD)), ids=[b.label for b in BAD])
def test_one_bad_rank_raises_before_the_collective_and_peers_do_not_hang(ranks, index):
    rows = [r["one_bad"][index] for r in ranks]
    bad = rows[rows[0]["bad_rank"]]
    assert bad["verdict"] is None, bad["verdict"]
    assert bad["raised_in"] < PROMPT_S
    for rank, row in enumerate(rows):
        assert row["err"] <= TOLERANCE[torch.float32], (rank, row)
        if rank != row["bad_rank"]:
            # the peer's collective completed only after the bad rank started its matching good call
            assert row["done"] >= bad["entered"], (rank, row, bad)
    assert len({row["digest"] for row in rows}) == 1


def test_zero_tokens_on_every_rank_is_a_no_op(ranks):
    for rank, r in enumerate(ranks):
        assert all(shape[0] == 0 and shape[-1] == Good.H for shape, _ in r["zero"]), r["zero"]
        assert r["zero"][2][1] == torch.float8_e4m3fn
        assert not r["zero_counted"], f"rank {rank}: zero tokens counted a call"
        assert r["after_zero"][0] <= TOLERANCE[torch.float32]
    assert len({r["after_zero"][1] for r in ranks}) == 1
