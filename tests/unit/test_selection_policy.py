"""Selection is a pure function of (problem, caps, backends, request, table): tested with fake backends whose
limits are known, so no device, process group, prepare or run is involved (the fakes raise if one is called).
"""
from __future__ import annotations

import random
from typing import Dict, Sequence, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arfuse.backends.base import Backend, Support
from arfuse.core.types import Capacity, GroupCaps, Pattern, Problem
from arfuse.select import policy
from arfuse.select.table import parse

CAPS = GroupCaps(world_size=2, rank=0, device_type="cpu")
HIDDEN = 64


class Fake(Backend):
    """A backend that accepts token counts in ``[lo, hi]`` per variant and must never be prepared or run."""

    def __init__(self, name: str, priority: int, spans: Dict[str, Tuple[int, int]]):
        self.name, self.priority, self.spans = name, priority, spans
        self.variants = tuple(spans)
        self.support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.bfloat16}))

    def check_variant(self, problem, caps, variant):
        lo, hi = self.spans[variant]
        if not lo <= problem.num_tokens <= hi:
            return f"{self.name}/{variant} runs {lo}..{hi} tokens only"
        return None

    def __repr__(self) -> str:
        return f"Fake({self.name!r}, {self.priority}, {self.spans})"

    def prepare(self, capacity, caps, group):
        raise RuntimeError("selection must not prepare a backend")

    def run(self, *args, **kwargs):
        raise RuntimeError("selection must not run a backend")


def reference() -> Fake:
    return Fake(policy.REFERENCE, 1000, {"default": (1, 1 << 30)})


def capacity(top: int) -> Capacity:
    return Capacity(top, HIDDEN, torch.float32, torch.device("cpu"))


def plans(backends: Dict[str, Backend], top: int, requested: str = "auto", entry=None):
    segments = policy.plan_segments(Pattern.RESIDUAL_RMSNORM, capacity(top), CAPS, backends, requested, entry)
    return segments, policy.expand(segments, top)


def problem(n: int) -> Problem:
    return Problem(Pattern.RESIDUAL_RMSNORM, n, HIDDEN, torch.float32, "cpu", CAPS.world_size)


def _capable(backends, n) -> Sequence[Tuple[str, str]]:
    return [(name, v) for name, v in policy.static_order(backends) if backends[name].check(problem(n), CAPS, v) is None]


@st.composite
def fake_backends(draw):
    """The reference plus 1-4 fakes whose capable token counts form one interval holding a power of two or the
    capacity (the assumption ``policy.capable_span`` documents), or no capable count at all."""
    top = draw(st.integers(1, 80))
    anchors = sorted({min(1 << k, top) for k in range(top.bit_length() + 1)})
    backends: Dict[str, Backend] = {policy.REFERENCE: reference()}
    for i in range(draw(st.integers(1, 4))):
        spans = {}
        for v in range(draw(st.integers(1, 2))):
            if draw(st.integers(0, 5)) == 0:
                spans[f"v{v}"] = (top + 1, top + 5)  # never capable here
                continue
            anchor = draw(st.sampled_from(anchors))
            spans[f"v{v}"] = (draw(st.integers(1, anchor)), draw(st.integers(anchor, top + 5)))
        name = f"fake{i}"
        backends[name] = Fake(name, draw(st.integers(0, 3)), spans)  # ties in priority on purpose
    return backends, top


@settings(max_examples=60, deadline=None)
@given(fake_backends(), st.randoms(use_true_random=False))
def test_auto_is_deterministic_capable_and_first_by_priority(drawn, rnd):
    backends, top = drawn
    segments, table = plans(backends, top)
    shuffled = list(backends.items())
    rnd.shuffle(shuffled)
    assert plans(dict(shuffled), top)[0] == segments  # registration order does not matter
    assert plans(backends, top)[0] == segments
    assert table[0] is None and len(table) == top + 1
    for n in range(1, top + 1):
        plan = table[n]
        assert backends[plan.backend].check(problem(n), CAPS, plan.variant) is None, (n, plan)
        assert (plan.backend, plan.variant) == _capable(backends, n)[0], (n, plan)
        assert not plan.fallback
        assert plan == policy.select(problem(n), CAPS, backends)  # the precomputed plan is the per-call one


@settings(max_examples=60, deadline=None)
@given(fake_backends(), st.data())
def test_named_backend_runs_where_it_can_and_falls_back_elsewhere(drawn, data):
    backends, top = drawn
    name = data.draw(st.sampled_from(sorted(n for n in backends if n != policy.REFERENCE)))
    variant = data.draw(st.sampled_from([None, *backends[name].variants]))
    requested = name if variant is None else f"{name}/{variant}"
    _, table = plans(backends, top, requested)
    allowed = backends[name].variants if variant is None else (variant,)
    for n in range(1, top + 1):
        plan = table[n]
        can = [v for v in allowed if backends[name].check(problem(n), CAPS, v) is None]
        if can:
            assert (plan.backend, plan.variant, plan.fallback) == (name, can[0], False), (n, plan)
        else:
            assert (plan.backend, plan.fallback) == (policy.REFERENCE, True), (n, plan)
            assert name in plan.reason and "tokens only" in plan.reason


def test_named_fallback_plan_segments_and_reasons():
    backends = {policy.REFERENCE: reference(), "small": Fake("small", 1, {"default": (1, 16)})}
    segments, _ = plans(backends, 64, "small")
    assert [(a, b, p.backend, p.fallback) for a, b, p in segments] == [(1, 16, "small", False),
                                                                      (17, 64, policy.REFERENCE, True)]
    assert "runs 1..16 tokens only" in segments[1][2].reason
    missing = policy.select(problem(4), CAPS, backends, "not_registered")
    assert (missing.backend, missing.fallback) == (policy.REFERENCE, True) and "not_registered" in missing.reason


def test_auto_without_any_capable_backend_uses_the_reference_without_a_fallback():
    backends = {"big_only": Fake("big_only", 0, {"default": (100, 200)})}
    plan = policy.select(problem(4), CAPS, backends)
    assert plan.backend == policy.REFERENCE and not plan.fallback and "big_only" in plan.reason


def _entry(ranges):
    doc = {"format": "arfuse-selection-table", "version": 1,
           "entries": [{"gpu": None, "world_size": CAPS.world_size, "dtype": "float32", "hidden_size": HIDDEN,
                        "ranges": ranges}]}
    return parse(doc, "test").entries[0]


def test_table_preferences_are_honored_where_capable():
    backends = {policy.REFERENCE: reference(),
                "fast": Fake("fast", 0, {"default": (1, 24)}),
                "slow": Fake("slow", 5, {"a": (1, 64), "b": (1, 64)})}
    entry = _entry([{"max_tokens": 8, "backend": "slow", "variant": "b"},
                    {"max_tokens": 32, "backend": "fast", "variant": "default", "alternatives": ["slow/a"]},
                    {"max_tokens": None, "backend": policy.REFERENCE}])
    _, table = plans(backends, 64, "auto", entry)
    expected = {1: ("slow", "b"), 8: ("slow", "b"),        # table beats the static priority
                9: ("fast", "default"), 24: ("fast", "default"),
                25: ("slow", "a"), 32: ("slow", "a"),      # preferred cannot run: the listed alternative
                33: (policy.REFERENCE, "default"), 64: (policy.REFERENCE, "default")}
    for n, choice in expected.items():
        plan = table[n]
        assert (plan.backend, plan.variant) == choice, (n, plan)
        assert not plan.fallback
        assert "table" in plan.reason, plan.reason
    # a named request keeps its own backend: the table only orders that backend's variants
    _, named = plans(backends, 64, "slow", entry)
    assert {(named[n].backend, named[n].variant) for n in (1, 8)} == {("slow", "b")}
    assert (named[20].backend, named[20].variant) == ("slow", "a")


def test_backend_capable_only_off_the_probe_points_is_never_planned_past_its_limit():
    backends = {policy.REFERENCE: reference(), "odd": Fake("odd", 0, {"default": (33, 33)}),
                "low": Fake("low", 0, {"default": (1, 32)})}
    _, table = plans(backends, 34)
    for n in range(1, 35):
        assert backends[table[n].backend].check(problem(n), CAPS, table[n].variant) is None, (n, table[n])


def test_expand_indexes_every_token_count_once():
    a, b = policy.Plan("x", "default"), policy.Plan("y", "v")
    table = policy.expand([(1, 3, a), (4, 5, b)], 5)
    assert table == [None, a, a, a, b, b]


@pytest.mark.parametrize("seed", range(3))
def test_selection_never_prepares_or_runs(seed):
    rng = random.Random(seed)
    backends = {policy.REFERENCE: reference(),
                **{f"f{i}": Fake(f"f{i}", rng.randint(0, 3), {"default": (1, rng.randint(1, 40))}) for i in range(3)}}
    for requested in ("auto", "f0", "f1/default"):
        plans(backends, 40, requested)  # a Fake raises if prepared or run
    assert policy.explain(problem(40), CAPS, backends)[policy.REFERENCE] is None
