"""Selection policy: the precomputed per-token plans equal a per-call ``select``; a backend that cannot run a size
is never chosen for it; a group spread over two hosts never gets an intra-node kernel; the per-call decision
cost, printed as a benchmark figure.

Uses whatever backends are registered at the time, plus fake ones that exist only here.
"""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from arfuse.backends import base
from arfuse.backends.base import Backend, Support
from arfuse.core.types import Capacity, GroupCaps, Pattern, Problem
from arfuse.select import policy
from arfuse.select.table import Entry, Range

# allow_unverified: selection is tested here, the verification record in test_verification.py
CUDA = GroupCaps(world_size=4, rank=0, device_type="cuda", dist_backend="nccl", gpu_name="NVIDIA H200", sm=(9, 0),
                 single_host=True, p2p=True, facts={"triton_symm": {"symm_mem": True, "triton": True}},
                 allow_unverified=True)
TWO_HOSTS = replace(CUDA, single_host=False, p2p=False,
                    notes=("single_host: ranks span hosts ['hostA', 'hostB']", "p2p: ranks are not on one host"))
NO_P2P = replace(CUDA, p2p=False, notes=("p2p: rank 1: GPU 1 cannot access GPU 0",))
CPU = GroupCaps(world_size=2, rank=0, device_type="cpu", dist_backend="gloo")


class Limited(Backend):
    """A fake backend: each variant runs token counts in [lo, hi]; on CPU and CUDA; bf16/fp32."""

    def __init__(self, name, limits, priority=100, multi_host=False):
        self.name, self.limits, self.priority, self.multi_host = name, dict(limits), priority, multi_host
        self.variants = tuple(self.limits)
        self.support = Support(devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({torch.bfloat16, torch.float32}))

    def check_variant(self, problem, caps, variant):
        lo, hi = self.limits[variant]
        if not lo <= problem.num_tokens <= hi:
            return f"{variant} runs {lo}..{hi} tokens"
        return None

    def prepare(self, capacity, caps, group):
        raise NotImplementedError("policy tests never prepare")

    def run(self, *args):
        raise NotImplementedError("policy tests never run")


def registered():
    return {b.name: b for b in base.registered()}


def capacity(top, hidden=4096, dtype=torch.bfloat16, device="cuda"):
    return Capacity(top, hidden, dtype, torch.device(device))


def problem(cap: Capacity, caps: GroupCaps, n: int, pattern=Pattern.RESIDUAL_RMSNORM) -> Problem:
    return Problem(pattern, n, cap.hidden_size, cap.dtype, cap.device.type, caps.world_size)


def plans_for(cap, caps, backends, requested="auto", entry=None, pattern=Pattern.RESIDUAL_RMSNORM):
    return policy.expand(policy.plan_segments(pattern, cap, caps, backends, requested, entry, "tuned"),
                         cap.max_tokens)


def assert_capable(plans, cap, caps, backends, pattern=Pattern.RESIDUAL_RMSNORM):
    for n in range(1, cap.max_tokens + 1):
        plan = plans[n]
        why = policy.why_not(backends[plan.backend], problem(cap, caps, n, pattern), caps, plan.variant)
        assert why is None, f"{n} tokens: chose {plan.key}, which cannot run it: {why}"


# -- precomputation equals a per-call decision -------------------------------------------------------------------
@st.composite
def scenarios(draw):
    backends = {}
    for i in range(draw(st.integers(1, 4))):
        limits = {}
        for j in range(draw(st.integers(1, 3))):
            lo = 1 << draw(st.integers(0, 6))  # capable counts: an interval starting at a power of two
            limits[f"v{j}"] = (lo, lo + draw(st.integers(0, 400)))
        backends[f"f{i}"] = Limited(f"f{i}", limits, draw(st.integers(0, 2000)), draw(st.booleans()))
    backends.update(registered())
    choices = [(n, v) for n, b in backends.items() for v in b.variants] + [("gone", "default"), ("f0", "nope")]
    entry = None
    if draw(st.booleans()):
        bounds = sorted(set(draw(st.lists(st.integers(1, 300), max_size=4))))
        ranges = [Range(b, None, tuple(draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3, unique=True))))
                  for b in bounds + ([None] if draw(st.booleans()) else [])]
        entry = Entry("NVIDIA H200", 4, "bfloat16", 4096, tuple(ranges)) if ranges else None
    requested = draw(st.sampled_from(["auto", "f0", "f0/v0", "torch_ref", "nccl", "unknown"]))
    caps = draw(st.sampled_from([CUDA, TWO_HOSTS, NO_P2P, CPU]))
    top = draw(st.integers(1, 300))
    pattern = draw(st.sampled_from(list(Pattern)))
    return backends, entry, requested, caps, top, pattern


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_precomputed_plans_equal_per_call_select_and_can_run(scenario):
    backends, entry, requested, caps, top, pattern = scenario
    cap = capacity(top, dtype=torch.bfloat16, device=caps.device_type)
    plans = plans_for(cap, caps, backends, requested, entry, pattern)
    bpt = cap.hidden_size * cap.itemsize
    for n in range(1, top + 1):
        preferred = entry.choices(n, bpt) if entry is not None else ()
        direct = policy.select(problem(cap, caps, n, pattern), caps, backends, requested, preferred, "tuned")
        got = plans[n]
        assert (got.backend, got.variant, got.fallback) == (direct.backend, direct.variant, direct.fallback), n
        if requested == "auto" and preferred:
            first = next((c for c in preferred if c[0] in backends and c[1] in backends[c[0]].variants
                          and policy.why_not(backends[c[0]], problem(cap, caps, n, pattern), caps, c[1]) is None),
                         None)
            if first is not None:
                assert (got.backend, got.variant) == first, f"{n}: table's first capable choice {first} not taken"
    assert_capable(plans, cap, caps, backends, pattern)


# -- a backend that cannot run a size is never chosen for it ----------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(0, 60), st.integers(0, 3)), min_size=1, max_size=5),
       st.integers(1, 200))
@example([(1, 31, 0), (33, 0, 0)], 34)  # 33..33 holds no probe point: found only by the per-segment check
@example([(5, 2, 0), (1, 3, 1)], 9)
def test_any_interval_of_capable_sizes_is_never_exceeded(spans, top):
    """Spans anywhere (not only around the probe points :func:`policy.capable_span` relies on)."""
    backends = {f"b{i}": Limited(f"b{i}", {"v": (lo, lo + width)}, priority) for i, (lo, width, priority)
                in enumerate(spans)}
    backends[policy.REFERENCE] = registered()[policy.REFERENCE]
    cap = capacity(top, device="cpu")
    assert_capable(plans_for(cap, CPU, backends), cap, CPU, backends)


@pytest.mark.parametrize("hidden,dtype", [(4096, torch.bfloat16), (8192, torch.bfloat16), (5120, torch.float16),
                                          (8192, torch.float32), (16392, torch.bfloat16), (100, torch.bfloat16)])
def test_registered_backends_only_run_sizes_they_accept(hidden, dtype):
    backends = registered()
    backends["tiny"] = Limited("tiny", {"a": (1, 16), "b": (64, 100000)}, priority=1)
    cap = capacity(4096, hidden, dtype)
    everyone = [(n, v) for n, b in backends.items() for v in b.variants]
    for preferred in everyone:
        entry = Entry("NVIDIA H200", 4, str(dtype).split(".")[1], hidden, (Range(None, None, (preferred,)),))
        plans = plans_for(cap, CUDA, backends, "auto", entry)
        assert_capable(plans, cap, CUDA, backends)
        b = backends[preferred[0]]
        for n in (1, 16, 17, 64, 1000, 4096):
            if policy.why_not(b, problem(cap, CUDA, n), CUDA, preferred[1]) is None:
                assert (plans[n].backend, plans[n].variant) == preferred, (preferred, n, plans[n])
        named = plans_for(cap, CUDA, backends, "/".join(preferred))
        assert_capable(named, cap, CUDA, backends)
        for n in range(1, cap.max_tokens + 1, 37):
            if named[n].fallback:
                assert named[n].backend == policy.REFERENCE and preferred[0] in named[n].reason, named[n]


def test_table_choice_that_is_not_registered_is_named_in_the_reason():
    backends = registered()
    cap = capacity(64)
    entry = Entry("NVIDIA H200", 4, "bfloat16", 4096,
                  (Range(None, None, (("gone", "default"), ("nccl", "nope"), ("nccl", "default"))),))
    plan = plans_for(cap, CUDA, backends, "auto", entry)[1]
    if "nccl" in backends:
        assert plan.key == "nccl" and plan.reason.startswith("tuned choice 3 (skipped gone: not registered and more")


def test_capable_span_finds_both_ends():
    b = Limited("x", {"mid": (8, 70), "low": (1, 5), "none": (2000, 3000), "all": (1, 10 ** 6)})
    cap = capacity(1000, device="cpu")
    template = problem(cap, CPU, 1)
    assert policy.capable_span(b, template, CPU, "mid", 1000) == (8, 70)
    assert policy.capable_span(b, template, CPU, "low", 1000) == (1, 5)
    assert policy.capable_span(b, template, CPU, "none", 1000) is None
    assert policy.capable_span(b, template, CPU, "all", 1000) == (1, 1000)


# -- groups over two hosts ----------------------------------------------------------------------------------------
def test_two_host_group_never_gets_an_intra_node_kernel():
    backends = registered()
    backends["intra"] = Limited("intra", {"fast": (1, 10 ** 6)}, priority=-5)  # would win everywhere
    backends["remote"] = Limited("remote", {"small": (1, 64)}, priority=-1, multi_host=True)
    cap = capacity(2048)
    entry = Entry("NVIDIA H200", 4, "bfloat16", 4096,
                  (Range(None, None, (("intra", "fast"), ("triton_symm", "lamport"), ("flashinfer", "oneshot"))),))
    for caps in (TWO_HOSTS, NO_P2P):
        restriction = policy.group_restriction(caps)
        assert "intra-node kernels excluded" in restriction
        plans = plans_for(cap, caps, backends, "auto", entry)
        for n in range(1, cap.max_tokens + 1):
            assert backends[plans[n].backend].multi_host, (n, plans[n])
        assert plans[64].backend == "remote" and plans[65].backend != "remote"
        assert "skipped intra/fast: " + restriction in plans[1].reason
        for name, why in policy.explain(problem(cap, caps, 1), caps, backends).items():
            if not backends[name.split("/")[0]].multi_host:
                assert why == restriction, name
        for requested in ("intra", "triton_symm/one_shot"):
            named = plans_for(cap, caps, backends, requested)
            assert all(p.fallback and p.backend == policy.REFERENCE and "intra-node" in p.reason
                       for p in named[1:]), requested
    assert "hostA" in policy.group_restriction(TWO_HOSTS) and "hostB" in policy.group_restriction(TWO_HOSTS)
    assert policy.group_restriction(CUDA) is None and policy.group_restriction(replace(TWO_HOSTS, world_size=1)) is None


def test_two_host_group_picks_nccl_among_the_registered_backends():
    backends = registered()
    plans = plans_for(capacity(2048), TWO_HOSTS, backends)
    expected = "nccl" if "nccl" in backends else policy.REFERENCE
    assert {p.backend for p in plans[1:]} == {expected}


def test_cpu_group_on_two_hosts_uses_the_reference():
    backends = registered()
    backends["intra"] = Limited("intra", {"fast": (1, 10 ** 6)}, priority=-5)
    caps = replace(CPU, single_host=False, notes=("single_host: ranks span hosts ['hostA', 'hostB']",))
    plans = plans_for(capacity(64, device="cpu"), caps, backends)
    assert {p.backend for p in plans[1:]} == {policy.REFERENCE}


# -- per-call decision cost ----------------------------------------------------------------------------------------
def test_per_call_decision_cost(figure):
    backends = registered()
    backends["tiny"] = Limited("tiny", {"a": (1, 16), "b": (1, 512)}, priority=1)
    cap = capacity(8192)
    entry = Entry("NVIDIA H200", 4, "bfloat16", 4096, (Range(64, None, (("tiny", "a"), ("tiny", "b"))),
                                                         Range(None, None, (("nccl", "default"),))))
    start = time.perf_counter()
    plans = {p: plans_for(cap, CUDA, backends, "auto", entry, p) for p in Pattern}
    build_ms = (time.perf_counter() - start) * 1e3
    sizes = [1 + (i * 7919) % cap.max_tokens for i in range(20000)]
    pattern = Pattern.RESIDUAL_RMSNORM
    start = time.perf_counter()
    for n in sizes:
        plans[pattern][n]
    lookup_ns = (time.perf_counter() - start) / len(sizes) * 1e9
    bpt = cap.hidden_size * cap.itemsize
    start = time.perf_counter()
    for n in sizes[:500]:
        policy.select(problem(cap, CUDA, n), CUDA, backends, "auto", entry.choices(n, bpt), "tuned")
    select_us = (time.perf_counter() - start) / 500 * 1e6
    for n in sizes[:500]:
        direct = policy.select(problem(cap, CUDA, n), CUDA, backends, "auto", entry.choices(n, bpt), "tuned")
        assert (plans[pattern][n].backend, plans[pattern][n].variant) == (direct.backend, direct.variant)
    figure("selection", f"plans for 4 patterns x {cap.max_tokens} tokens built in {build_ms:.1f} ms; per call "
           f"{lookup_ns:.0f} ns (precomputed list index) vs {select_us:.1f} µs (select() per call)")
