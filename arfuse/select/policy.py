"""Pure selection: ``select(problem, caps, ...) -> Plan`` and the per-token-count plan table built from it.

No I/O and no collectives: every rank computes the same plans from the same agreed ``GroupCaps``, the same table
and the same shapes, so ranks never need to talk per call. Hard requirements come from each backend's ``check``;
preference comes from the tuned table, then the shipped defaults, then the backends' static ``priority``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from arfuse.backends.base import Backend
from arfuse.core.types import Capacity, GroupCaps, Pattern, Plan, Problem
from arfuse.select.table import Entry

Choice = Tuple[str, str]
REFERENCE = "torch_ref"
AUTO = "auto"


def parse_request(requested: str) -> Tuple[str, Optional[str]]:
    """``"auto"``, ``"name"`` or ``"name/variant"`` -> (name, variant or None)."""
    name, _, variant = requested.partition("/")
    return name, (variant or None)


def static_order(backends: Mapping[str, Backend]) -> List[Choice]:
    """Every (backend, variant) by ascending backend priority, variants in declared order."""
    ordered = sorted(backends.values(), key=lambda b: b.priority)
    return [(b.name, v) for b in ordered for v in b.variants]


def candidates(requested: str, backends: Mapping[str, Backend], preferred: Optional[Choice]) -> List[Choice]:
    """The ordered choices ``select`` tries for this request."""
    name, variant = parse_request(requested)
    if name == AUTO:
        order = static_order(backends)
    elif variant is not None:
        order = [(name, variant)]
    else:
        order = [(name, v) for v in backends[name].variants] if name in backends else []
    if preferred is not None and preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    return order


def select(problem: Problem, caps: GroupCaps, backends: Mapping[str, Backend], requested: str = AUTO,
           preferred: Optional[Choice] = None, source: str = "priority") -> Plan:
    """The plan for one problem: the first capable choice, or a reference fallback explaining why."""
    name, _ = parse_request(requested)
    if name != AUTO and name not in backends:
        return Plan(REFERENCE, "default", f"{name}: not available", fallback=True)
    first_reason = None
    for backend_name, variant in candidates(requested, backends, preferred):
        backend = backends.get(backend_name)
        if backend is None:
            continue
        why = backend.check(problem, caps, variant)
        if why is None:
            how = source if (backend_name, variant) == preferred else "priority"
            return Plan(backend_name, variant, f"{how}: {problem.num_tokens} tokens")
        first_reason = first_reason or f"{backend_name}/{variant}: {why}"
    if name == AUTO:
        return Plan(REFERENCE, "default", f"no capable backend ({first_reason})", fallback=False)
    return Plan(REFERENCE, "default", first_reason or f"{name}: cannot run", fallback=True)


def _largest_supported(backend: Backend, template: Problem, caps: GroupCaps, variant: str, top: int) -> int:
    """Largest token count in [0, top] the backend accepts, by bisection (check is monotone in tokens)."""
    def ok(n: int) -> bool:
        return backend.check(replace(template, num_tokens=n), caps, variant) is None

    if not ok(1):
        return 0
    if ok(top):
        return top
    lo, hi = 1, top  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def plan_segments(pattern: Pattern, capacity: Capacity, caps: GroupCaps, backends: Mapping[str, Backend],
                  requested: str = AUTO, entry: Optional[Entry] = None,
                  source: str = "table") -> List[Tuple[int, int, Plan]]:
    """Plans for 1..capacity.max_tokens as ``(first, last, plan)`` segments (inclusive bounds)."""
    top = capacity.max_tokens
    template = Problem(pattern, 1, capacity.hidden_size, capacity.dtype, capacity.device.type, caps.world_size)
    bytes_per_token = capacity.hidden_size * capacity.itemsize
    cuts = {1}
    for b_name, variant in candidates(requested, backends, None):
        if b_name in backends:
            largest = _largest_supported(backends[b_name], template, caps, variant, top)
            if 0 < largest < top:
                cuts.add(largest + 1)
    if entry is not None:
        cuts.update(b + 1 for b in entry.bounds(bytes_per_token) if 0 < b < top)
    starts = sorted(c for c in cuts if c <= top)
    segments = []
    for i, first in enumerate(starts):
        last = starts[i + 1] - 1 if i + 1 < len(starts) else top
        preferred = entry.choice(first, bytes_per_token) if entry is not None else None
        plan = select(replace(template, num_tokens=first), caps, backends, requested, preferred, source)
        segments.append((first, last, plan))
    return segments


def expand(segments: Sequence[Tuple[int, int, Plan]], top: int) -> List[Optional[Plan]]:
    """A list indexed by token count (index 0 unused) for O(1) lookup on the hot path."""
    table: List[Optional[Plan]] = [None] * (top + 1)
    for first, last, plan in segments:
        table[first:last + 1] = [plan] * (last - first + 1)
    return table


def explain(problem: Problem, caps: GroupCaps, backends: Mapping[str, Backend]) -> Dict[str, Optional[str]]:
    """For doctor: every backend/variant and why it cannot run ``problem`` (None: it can)."""
    return {f"{n}/{v}": backends[n].check(problem, caps, v) for n, v in static_order(backends)}
