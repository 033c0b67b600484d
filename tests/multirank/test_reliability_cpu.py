"""Faults on 3 gloo ranks, under a wall-clock bound: nobody hangs, nothing wrong is returned.

1. One rank fails: a registered backend whose ``prepare`` raises on rank 1 only, requested by name and wanted by
   ``auto`` (priority 1). Every rank drops it together (the vote), names rank 1 in ``fusion.disabled`` and the
   counted fallbacks, and every op (object, functional and module forms; poisoned outputs) still matches the
   float64 reference with bitwise-identical outputs across ranks; strict mode raises FallbackError on every rank.
   (FlashInfer's workspace vote, with a fake FlashInfer failing on rank 1, is tested in test_flashinfer_vote.py.)
2. Mid-run backend error: a backend whose ``run`` raises on its first call on every rank, after writing garbage
   into the outputs. Strict: BackendError, nothing returned. Otherwise: the call returns the fallback's correct
   result in the caller's (NaN-poisoned) tensors, the backend is disabled for good with the reason logged once
   and counted, and no later call reaches it. In place, where the failed launch may have overwritten the residual
   it had to read, the call must raise rather than return a result computed from it.
3. Mid-run backend error on one rank only (after its collective ran): the peers' results stand; that rank cannot
   fall back alone (its recomputation's collective would pair with the peers' next call), so it waits for the
   error vote's bound, raises BackendError "out of step", and every later call on it raises.

One launch runs every scenario; each rank reports what happened and the tests below judge it.
"""
from __future__ import annotations

import logging
import time

import pytest
import torch
from tests._ranks import RECORDS_PER_EXERCISE, check_records, exercise, launch

import arfuse
from arfuse import functional as F
from arfuse.core.types import Pattern
from arfuse.testing import save_figures
from arfuse.testing.faults import FaultBackend, registered
from arfuse.verify import TOLERANCE, Case, digest, poison, reference, rel_err

WORLD = 3
FAILING_RANK = 1
WALL_S = 60.0  # the whole launch; a hang would hit it (the process group's own timeout is 300 s)
HIDDEN, MAX_TOKENS = 64, 32
OPTS = dict(max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=torch.float32, device="cpu")


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _checked(fusion, tokens, seed, rank, world, inplace=False):
    """One residual_rmsnorm into NaN-poisoned caller outputs: (error vs reference, digest, outputs are the
    caller's tensors)."""
    case = Case(tokens, HIDDEN, torch.float32, seed)
    x, residual, weight = case.x(rank), case.residual(), case.weight()
    norm_out = poison(torch.empty_like(x))
    if inplace:
        norm, res = fusion.residual_rmsnorm(x, residual, weight, case.eps, norm_out=norm_out, inplace=True)
        mine = norm is norm_out and res is residual
    else:
        res_out = poison(torch.empty_like(x))
        norm, res = fusion.residual_rmsnorm(x, residual, weight, case.eps, norm_out=norm_out, residual_out=res_out)
        mine = norm is norm_out and res is res_out
    ref_norm, ref_res = reference(case, world, Pattern.RESIDUAL_RMSNORM)
    return max(rel_err(norm, ref_norm), rel_err(res, ref_res)), digest(norm, res), mine


def _construct(requested, strict):
    """Build a fusion object; returns (object or None, error type, error reason/backend, seconds)."""
    t0 = time.monotonic()
    try:
        fusion = arfuse.AllReduceFusion(backend=requested, strict=strict, **OPTS)
    except arfuse.FallbackError as e:
        return None, "FallbackError", (e.backend, e.reason), time.monotonic() - t0
    return fusion, None, None, time.monotonic() - t0


def _prepare_fault(rank, world):
    """Scenario 1, for a named request and for auto, lenient and strict."""
    out = {}
    for requested in ("test_prepare_fault", "auto"):
        backend = FaultBackend("test_prepare_fault", priority=1, prepare_fails_on=(FAILING_RANK,))
        with registered(backend):
            fusion, _, _, seconds = _construct(requested, strict=False)
            records = []
            for i, tokens in enumerate((1, 9, MAX_TOKENS)):
                records += exercise(fusion, Case(tokens, HIDDEN, torch.float32, 100 + i), rank, world)
            out[requested] = dict(seconds=seconds, disabled=fusion.disabled, stats=fusion.stats(),
                                  plan=fusion.plan("residual_rmsnorm", 4), records=records)
            fusion.close()
            F.close_all()
            out[requested]["live"] = backend.live  # workspaces the other ranks made were closed after the vote
            _, error, detail, seconds = _construct(requested, strict=True)
            out[requested]["strict"] = (error, detail, seconds)
            # the group is still in step after every rank raised
            with arfuse.AllReduceFusion(backend="torch_ref", **OPTS) as after:
                out[requested]["after_strict"] = _checked(after, 5, 200, rank, world)
    return out


def _run_fault(rank, world):
    """Scenario 2: the first run call raises on every rank."""
    out = {}
    backend = FaultBackend("test_run_fault_strict", run_fails_on=(1,))
    with registered(backend), arfuse.AllReduceFusion(backend=backend.name, strict=True, **OPTS) as fusion:
        try:
            returned = _checked(fusion, 4, 300, rank, world)
            raised = None
        except arfuse.BackendError as e:
            returned, raised = None, str(e)
        second = _checked(fusion, 4, 301, rank, world)  # the fault was one call: the group is in step
        out["strict"] = dict(raised=raised, returned=returned, second=second, stats=fusion.stats(),
                             disabled=fusion.disabled, runs=backend.made[0].runs)

    for requested in ("test_run_fault", "auto"):
        backend = FaultBackend("test_run_fault", run_fails_on=(1,))
        with registered(backend), arfuse.AllReduceFusion(backend=requested, strict=False, **OPTS) as fusion:
            wanted = fusion.plan("residual_rmsnorm", 4)
            first = _checked(fusion, 4, 400, rank, world)
            records = []
            for i, tokens in enumerate((1, 4, MAX_TOKENS)):
                records += exercise(fusion, Case(tokens, HIDDEN, torch.float32, 500 + i), rank, world)
            out[requested] = dict(wanted=wanted, first=first, records=records, stats=fusion.stats(),
                                  disabled=fusion.disabled, plan=fusion.plan("residual_rmsnorm", 4),
                                  runs=backend.made[0].runs)  # this object's workspace (made first)
        F.close_all()

    backend = FaultBackend("test_run_fault_inplace", run_fails_on=(1,), corrupt_residual=True)
    with registered(backend), arfuse.AllReduceFusion(backend=backend.name, strict=False, **OPTS) as fusion:
        try:
            returned, raised = _checked(fusion, 4, 600, rank, world, inplace=True), None
        except arfuse.ArfuseError as e:
            returned, raised = None, f"{type(e).__name__}: {e}"
        out["inplace"] = dict(returned=returned, raised=raised, disabled=fusion.disabled,
                              after=_checked(fusion, 4, 601, rank, world, inplace=True),
                              runs=backend.made[0].runs)
    return out


OUT_OF_STEP_TIMEOUT_S = 2.0


def _one_rank_run_fault(rank, world):
    """Scenario 3 (last: it leaves the group's error vote timed out on the failing rank): the first call fails on
    rank 1 only, after its collective ran. The peers return their correct results; rank 1 cannot fall back alone
    (its recomputation would add a collective nobody else makes), so it raises, and so does every later call."""
    backend = FaultBackend("test_run_fault_one_rank", run_fails_on=(1,), run_fails_on_ranks=(FAILING_RANK,),
                           fail_after_compute=True)
    with registered(backend):
        fusion = arfuse.AllReduceFusion(backend=backend.name, strict=False, timeout_s=OUT_OF_STEP_TIMEOUT_S, **OPTS)
        t0 = time.monotonic()
        try:
            first, raised = _checked(fusion, 4, 700, rank, world), None
        except arfuse.BackendError as e:
            first, raised = None, str(e)
        waited, again = time.monotonic() - t0, None
        if rank != FAILING_RANK:  # peers stay alive (as in a server) so rank 1's vote must run into its bound
            time.sleep(OUT_OF_STEP_TIMEOUT_S + 1.0)
        if raised is not None:  # its peers made no further call: only the failing rank may try one
            try:
                _checked(fusion, 4, 701, rank, world)
            except arfuse.BackendError as e:
                again = str(e)
        out = dict(first=first, raised=raised, again=again, waited=waited, stats=fusion.stats())
        fusion.close()
    return out


def _all_scenarios(rank, world):
    log = _Messages()
    logging.getLogger("arfuse").addHandler(log)
    t0 = time.monotonic()
    out = {"prepare": _prepare_fault(rank, world), "run": _run_fault(rank, world),
           "one_rank": _one_rank_run_fault(rank, world)}
    out["seconds"] = time.monotonic() - t0
    out["log"] = log.messages
    return out


@pytest.fixture(scope="module")
def ranks():
    t0 = time.monotonic()
    hung = 0
    try:
        results = launch(_all_scenarios, WORLD, timeout_s=WALL_S)
    except TimeoutError:
        hung = 1
        raise
    finally:
        if hung:
            save_figures("faults_cpu", dict(cases=0, replays=0, faults_injected=0, faults_survived=0, hangs=1,
                                            wrong_results=0, worst_error=None))
    assert time.monotonic() - t0 < WALL_S
    return results


def _records(ranks, *path):
    per_rank = []
    for r in ranks:
        node = r
        for key in path:
            node = node[key]
        per_rank.append(node["records"])
    return per_rank


def _matrix_problems(ranks, context, *path) -> list:
    """check_records' verdict as a list (reference errors, NaN, outputs differing across ranks)."""
    try:
        checked = check_records(_records(ranks, *path), context)
    except AssertionError as e:
        return [str(e)]
    return [] if checked == 3 * RECORDS_PER_EXERCISE else [f"{context}: {checked} records checked"]


# -- judges: each returns the problems found (empty: the fault was survived) --------------------------------------

def judge_prepare_lenient(ranks, requested) -> list:
    problems, reasons = [], set()
    for rank, r in enumerate(ranks):
        got = r["prepare"][requested]
        reason = got["disabled"].get("test_prepare_fault", "")
        reasons.add(reason)
        if f"rank {FAILING_RANK}: InjectedFault" not in reason or f"failure on rank {FAILING_RANK}" not in reason:
            problems.append(f"rank {rank}: disabled reason does not name rank {FAILING_RANK}: {got['disabled']}")
        if not any(f"rank {FAILING_RANK}" in k for k in got["stats"]["fallbacks"]):
            problems.append(f"rank {rank}: no counted fallback names rank {FAILING_RANK}: {got['stats']}")
        if set(got["stats"]["calls"]) != {"torch_ref"} or got["plan"].backend != "torch_ref":
            problems.append(f"rank {rank}: calls {got['stats']['calls']}, plan {got['plan']}")
        if got["plan"].fallback != (requested != "auto"):  # auto choosing another path is no fallback
            problems.append(f"rank {rank}: plan {got['plan']}")
        if got["live"] != 0:
            problems.append(f"rank {rank}: {got['live']} fault workspaces left open")
        logged = [m for m in r["log"] if "test_prepare_fault disabled" in m and f"rank {FAILING_RANK}" in m]
        if len(logged) != 1:  # once per process, though two objects met the same fault
            problems.append(f"rank {rank}: logged {len(logged)} times: {r['log']}")
    if len(reasons) != 1:
        problems.append(f"ranks report different reasons: {reasons}")
    return problems + _matrix_problems(ranks, f"prepare fault, {requested}", "prepare", requested)


def judge_prepare_strict(ranks, requested) -> list:
    problems = []
    for rank, r in enumerate(ranks):
        error, detail, _ = r["prepare"][requested]["strict"]
        if error != "FallbackError" or detail[0] != "test_prepare_fault" \
                or f"rank {FAILING_RANK}: InjectedFault" not in detail[1]:
            problems.append(f"rank {rank}: strict construction gave {error} {detail}")
        if not r["prepare"][requested]["after_strict"][0] <= TOLERANCE[torch.float32]:
            problems.append(f"rank {rank}: the call after the strict failure is wrong")
    if len({r["prepare"][requested]["after_strict"][1] for r in ranks}) != 1:
        problems.append("outputs after the strict failure differ across ranks")
    return problems


def judge_run_strict(ranks) -> list:
    problems = []
    for rank, r in enumerate(ranks):
        got = r["run"]["strict"]
        if got["returned"] is not None or "injected launch failure" not in (got["raised"] or ""):
            problems.append(f"rank {rank}: strict call returned {got['returned']}, raised {got['raised']}")
        if list(got["stats"]["errors"].values()) != [1] or got["stats"]["calls"] != {"test_run_fault_strict": 1}:
            problems.append(f"rank {rank}: counters {got['stats']}")  # only the second call may count
        if not (got["second"][0] <= TOLERANCE[torch.float32] and got["second"][2]):
            problems.append(f"rank {rank}: the next call is wrong: {got['second']}")
    if len({r["run"]["strict"]["second"][1] for r in ranks}) != 1:
        problems.append("outputs of the next call differ across ranks")
    return problems


def judge_run_lenient(ranks, requested) -> list:
    problems, firsts = [], set()
    for rank, r in enumerate(ranks):
        got = r["run"][requested]
        err, dig, mine = got["first"]
        firsts.add(dig)
        if got["wanted"].backend != "test_run_fault":
            problems.append(f"rank {rank}: the fault path was not the plan: {got['wanted']}")
        if not mine or not err <= TOLERANCE[torch.float32]:  # inf: a NaN was left, i.e. unwritten
            problems.append(f"rank {rank}: first call error {err}, caller's tensors returned: {mine}")
        if "injected launch failure" not in got["disabled"].get("test_run_fault", ""):
            problems.append(f"rank {rank}: not disabled: {got['disabled']}")
        errors = got["stats"]["errors"]
        if len(errors) != 1 or list(errors.values()) != [1] or "test_run_fault raised InjectedFault" not in \
                next(iter(errors), ""):
            problems.append(f"rank {rank}: errors counted {errors}")
        if not any("test_run_fault raised InjectedFault" in k for k in got["stats"]["fallbacks"]):
            problems.append(f"rank {rank}: fallback not counted: {got['stats']['fallbacks']}")
        if set(got["stats"]["calls"]) != {"torch_ref"} or got["plan"].backend != "torch_ref":
            problems.append(f"rank {rank}: calls {got['stats']['calls']}, plan {got['plan']}")
        if got["runs"] != 1:
            problems.append(f"rank {rank}: the disabled backend ran {got['runs']} times")
        logged = [m for m in r["log"] if "backend test_run_fault disabled" in m]
        if len(logged) != 1:
            problems.append(f"rank {rank}: logged {len(logged)} times: {r['log']}")
    if len(firsts) != 1:
        problems.append("first-call outputs differ across ranks")
    return problems + _matrix_problems(ranks, f"run fault, {requested}", "run", requested)


def judge_run_inplace(ranks) -> list:
    problems = []
    for rank, r in enumerate(ranks):
        got = r["run"]["inplace"]
        if got["returned"] is not None:  # recovering is fine only if the result is right
            if not got["returned"][0] <= TOLERANCE[torch.float32]:
                problems.append(f"rank {rank}: returned a wrong result (error {got['returned'][0]})")
        elif not (got["raised"].startswith("BackendError") and "in place" in got["raised"]):
            problems.append(f"rank {rank}: raised {got['raised']}")
        if "test_run_fault_inplace" not in got["disabled"] or got["runs"] != 1:
            problems.append(f"rank {rank}: disabled {got['disabled']}, runs {got['runs']}")
        if not (got["after"][0] <= TOLERANCE[torch.float32] and got["after"][2]):
            problems.append(f"rank {rank}: the next call is wrong: {got['after']}")
    if len({r["run"]["inplace"]["after"][1] for r in ranks}) != 1:
        problems.append("outputs of the next call differ across ranks")
    return problems


def judge_one_rank_run_fault(ranks) -> list:
    problems = []
    for rank, r in enumerate(ranks):
        got = r["one_rank"]
        if rank != FAILING_RANK:
            if got["raised"] is not None or not (got["first"][0] <= TOLERANCE[torch.float32] and got["first"][2]):
                problems.append(f"rank {rank}: its call should have succeeded: {got}")
            continue
        if got["first"] is not None or not got["raised"] or "out of step" not in got["raised"] \
                or f"rank {FAILING_RANK}" not in got["raised"]:
            problems.append(f"rank {rank}: returned {got['first']}, raised {got['raised']}")
        if not got["again"] or "out of step" not in got["again"]:
            problems.append(f"rank {rank}: a later call did not raise: {got['again']}")
        if not OUT_OF_STEP_TIMEOUT_S * 0.9 <= got["waited"] < OUT_OF_STEP_TIMEOUT_S + 8:
            problems.append(f"rank {rank}: waited {got['waited']:.1f} s for its peers")
        if set(got["stats"]["calls"]) - {"test_run_fault_one_rank"}:
            problems.append(f"rank {rank}: fell back alone: {got['stats']['calls']}")
    return problems


JUDGES = {
    "prepare fault, named": lambda r: judge_prepare_lenient(r, "test_prepare_fault"),
    "prepare fault, auto": lambda r: judge_prepare_lenient(r, "auto"),
    "prepare fault, named, strict": lambda r: judge_prepare_strict(r, "test_prepare_fault"),
    "prepare fault, auto, strict": lambda r: judge_prepare_strict(r, "auto"),
    "run fault, strict": judge_run_strict,
    "run fault, named": lambda r: judge_run_lenient(r, "test_run_fault"),
    "run fault, auto": lambda r: judge_run_lenient(r, "auto"),
    "run fault, in place": judge_run_inplace,
    "run fault on one rank": judge_one_rank_run_fault,
}


# -- tests -----------------------------------------------------------------------------------------------------------

def test_every_rank_finishes_within_the_bound(ranks):
    for rank, r in enumerate(ranks):
        assert r["seconds"] < WALL_S, rank
        for requested in ("test_prepare_fault", "auto"):
            assert r["prepare"][requested]["seconds"] < 10.0, (rank, requested)
            assert r["prepare"][requested]["strict"][2] < 10.0, (rank, requested)


@pytest.mark.parametrize("fault", list(JUDGES))
def test_fault_is_survived(ranks, fault):
    problems = JUDGES[fault](ranks)
    assert not problems, f"{fault}:\n" + "\n".join(problems)


def test_figures(ranks):
    """Record what was injected and survived (for bench/reliability_summary.py)."""
    verdicts = {fault: judge(ranks) for fault, judge in JUDGES.items()}
    records = [rec for key in ("test_prepare_fault", "auto") for recs in _records(ranks, "prepare", key)
               for rec in recs]
    records += [rec for key in ("test_run_fault", "auto") for recs in _records(ranks, "run", key) for rec in recs]
    wrong = sum(bool(rec.failures()) for rec in records)
    save_figures("faults_cpu", dict(cases=len(records), replays=0, faults_injected=len(verdicts),
                                    faults_survived=sum(not p for p in verdicts.values()), hangs=0,
                                    wrong_results=wrong,
                                    worst_error=max(e for rec in records for e in rec.errors.values())),
                 {"world_size": WORLD, "verdicts": verdicts, "seconds_per_rank": [r["seconds"] for r in ranks]})
    assert wrong == 0
