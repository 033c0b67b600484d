"""Pure selection: ``select(problem, caps, backends) -> Plan`` and the per-token-count plan table built from it.

No I/O and no collectives: every rank computes the same plans from the same agreed ``GroupCaps``, the same table
entry and the same shapes, so ranks never talk per call. Hard requirements come from :func:`why_not` (each
backend's ``check`` plus the group rule below); preference comes from the table entry's choices for the token
count, then the backends' static ``priority``. Backends are never named here: a new one joins by registering.

The group rule: when the ranks are not all on one host with P2P among them, only backends that declare
``multi_host = True`` (they need neither P2P nor shared memory, e.g. NCCL + the norm kernel) may run.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from arfuse.backends.base import Backend
from arfuse.core.spec import FusionSpec
from arfuse.core.types import Capacity, GroupCaps, Plan, Problem
from arfuse.select.table import Choice, Entry, choice_text

REFERENCE = "torch_ref"
AUTO = "auto"
Segment = Tuple[int, int, Plan]


def parse_request(requested: str) -> Tuple[str, Optional[str]]:
    """``"auto"``, ``"name"`` or ``"name/variant"`` -> (name, variant or None)."""
    name, _, variant = requested.partition("/")
    return name, (variant or None)


def static_order(backends: Mapping[str, Backend]) -> List[Choice]:
    """Every (backend, variant) by ascending backend priority, variants in declared order."""
    ordered = sorted(backends.values(), key=lambda b: (b.priority, b.name))
    return [(b.name, v) for b in ordered for v in b.variants]


def group_restriction(caps: GroupCaps) -> Optional[str]:
    """Why this group may only use multi-host backends, or None (for doctor, the counters and plan reasons)."""
    if caps.world_size <= 1:
        return None
    if not caps.single_host:
        return f"multi-host group ({caps.note('single_host')}): intra-node kernels excluded"
    if caps.device_type == "cuda" and not caps.p2p:
        return f"no P2P among the ranks ({caps.note('p2p')}): intra-node kernels excluded"
    return None


def why_not(backend: Backend, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
    """Why ``backend``/``variant`` cannot run ``problem`` on this group, or None. Pure."""
    if not backend.multi_host:
        restriction = group_restriction(caps)
        if restriction is not None:
            return restriction
    return backend.check(problem, caps, variant)


def candidates(requested: str, backends: Mapping[str, Backend], preferred: Sequence[Choice] = ()) -> List[Choice]:
    """The ordered choices ``select`` tries: the preferred ones that fit the request, then the static order."""
    name, variant = parse_request(requested)
    if name == AUTO:
        order = static_order(backends)
    elif variant is not None:
        order = [(name, variant)]
    else:
        order = [(name, v) for v in backends[name].variants] if name in backends else []
    first = [c for c in dict.fromkeys(preferred) if c in order]
    return first + [c for c in order if c not in first]


def select(problem: Problem, caps: GroupCaps, backends: Mapping[str, Backend], requested: str = AUTO,
           preferred: Sequence[Choice] = (), source: str = "priority") -> Plan:
    """The plan for one problem: the first capable candidate, or the reference backend saying why.

    ``preferred``: the table's choices for this size, best first. The plan is a fallback when a named request
    (``"name"`` or ``"name/variant"``) cannot run; ``auto`` never falls back (the reference is one of its
    candidates).
    """
    name, _ = parse_request(requested)
    if name != AUTO and name not in backends:
        return Plan(REFERENCE, "default", f"{name}: not available", fallback=True)
    preferred = list(preferred)
    skipped: List[str] = [f"{choice_text(c)}: not registered" for c in preferred if name == AUTO and
                          (c[0] not in backends or c[1] not in backends[c[0]].variants)]
    for backend_name, variant in candidates(requested, backends, preferred):
        why = why_not(backends[backend_name], problem, caps, variant)
        if why is not None:
            skipped.append(f"{choice_text((backend_name, variant))}: {why}")
            continue
        choice = (backend_name, variant)
        text = f"{source} choice {preferred.index(choice) + 1}" if choice in preferred else "priority"
        if skipped:
            text += f" (skipped {skipped[0]}{' and more' if len(skipped) > 1 else ''})"
        return Plan(backend_name, variant, text)
    first_reason = skipped[0] if skipped else f"{name}: cannot run"
    if name == AUTO:
        return Plan(REFERENCE, "default", f"no capable backend ({first_reason})")
    return Plan(REFERENCE, "default", first_reason, fallback=True)


def capable_span(backend: Backend, template: Problem, caps: GroupCaps, variant: str,
                 top: int) -> Optional[Tuple[int, int]]:
    """The token counts in [1, top] the backend accepts, as (first, last), or None.

    Assumes they form one interval that holds a power of two or ``top`` (true of size caps and of minimum
    sizes); found with O(log top) checks. A span missed because it holds neither can only make a plan less
    than optimal, never unsafe: :func:`plan_segments` checks each chosen path to the end of its segment.
    """
    def ok(n: int) -> bool:
        return why_not(backend, replace(template, num_tokens=n), caps, variant) is None

    probes = sorted({min(1 << k, top) for k in range(top.bit_length() + 1)})
    good = [n for n in probes if ok(n)]
    if not good:
        return None
    lo, hi = good[0], good[-1]
    below = max([n for n in probes if n < lo], default=0)  # not ok (or 0)
    while lo - below > 1:
        mid = (lo + below) // 2
        lo, below = (mid, below) if ok(mid) else (lo, mid)
    above = min([n for n in probes if n > hi], default=top + 1)  # not ok (or past the top)
    while above - hi > 1:
        mid = (hi + above) // 2
        hi, above = (mid, above) if ok(mid) else (hi, mid)
    return lo, hi


def plan_segments(spec: FusionSpec, capacity: Capacity, caps: GroupCaps, backends: Mapping[str, Backend],
                  requested: str = AUTO, entry: Optional[Entry] = None, source: str = "table") -> List[Segment]:
    """Plans for 1..capacity.max_tokens as ``(first, last, plan)`` segments (inclusive bounds).

    Segments are cut wherever a candidate starts or stops being capable (:func:`capable_span`) and at the
    entry's range bounds, so one ``select`` per segment decides every token count in it. A segment is also cut
    where its chosen path stops being capable, so no plan ever names a path for a size it refuses, even if a
    span was missed.
    """
    top = capacity.max_tokens
    template = Problem(spec, 1, capacity.hidden_size, capacity.dtype, capacity.device.type, caps.world_size)
    bytes_per_token = capacity.hidden_size * capacity.itemsize
    cuts = {1}
    for b_name, variant in candidates(requested, backends):
        span = capable_span(backends[b_name], template, caps, variant, top)
        if span is not None:
            cuts.update((span[0], span[1] + 1))
    if entry is not None:
        cuts.update(b + 1 for b in entry.bounds(bytes_per_token))
    bounds = sorted(c for c in cuts if 1 <= c <= top) + [top + 1]
    segments = []
    for first, after in zip(bounds, bounds[1:]):
        start = first
        while start < after:
            preferred = entry.choices(start, bytes_per_token) if entry is not None else ()
            plan = select(replace(template, num_tokens=start), caps, backends, requested, preferred, source)
            end = _last_capable(plan, backends, template, caps, start, after - 1)
            segments.append((start, end, plan))
            start = end + 1
    return _merge(segments)


def _last_capable(plan: Plan, backends: Mapping[str, Backend], template: Problem, caps: GroupCaps, first: int,
                  last: int) -> int:
    """The last count in [first, last] up to which ``plan`` stays capable (``last`` if it is not a registered
    path capable at ``first``, e.g. a reference fallback)."""
    backend = backends.get(plan.backend)

    def ok(n: int) -> bool:
        return why_not(backend, replace(template, num_tokens=n), caps, plan.variant) is None

    if backend is None or not ok(first) or ok(last):
        return last
    lo, hi = first, last  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _merge(segments: List[Segment]) -> List[Segment]:
    out: List[Segment] = []
    for first, last, plan in segments:
        if out and out[-1][2] == plan:
            out[-1] = (out[-1][0], last, plan)
        else:
            out.append((first, last, plan))
    return out


def expand(segments: Sequence[Segment], top: int) -> List[Optional[Plan]]:
    """A list indexed by token count (index 0 unused) for O(1) lookup on the hot path."""
    table: List[Optional[Plan]] = [None] * (top + 1)
    for first, last, plan in segments:
        table[first:last + 1] = [plan] * (last - first + 1)
    return table


def explain(problem: Problem, caps: GroupCaps, backends: Mapping[str, Backend]) -> Dict[str, Optional[str]]:
    """For doctor: every backend/variant and why it cannot run ``problem`` on this group (None: it can)."""
    return {choice_text((n, v)): why_not(backends[n], problem, caps, v) for n, v in static_order(backends)}
