"""The executor behind :class:`arfuse.AllReduceFusion`: agreed capabilities, prepared workspaces, precomputed
plans, dispatch and counting. Collectives happen only in the constructor (probe, prepare, votes) and inside
``Backend.run``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional

import torch

from arfuse.backends import base
from arfuse.core.counters import Counters, log_once, logger, resolve_strict
from arfuse.core.errors import BackendError, FallbackError, PeerTimeoutError
from arfuse.core.spec import FusionSpec, Prologue, catalogue
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Plan, Problem
from arfuse.probe import vote
from arfuse.probe.group import group_caps
from arfuse.select import policy, table as tables

REFERENCE = policy.REFERENCE
MOE_FINALIZE = Prologue.MOE_FINALIZE
MAX_ROW_ROUTES = 4096  # MoE routes planned per (spec, tokens, expert rows) kept at once
_CONSTRUCTED: Dict[tuple, int] = {}  # fusion objects built per rank set, in this process


class Route:
    """One plan as :meth:`Executor.run` dispatches it: the backend object, its workspace, the variant and the
    counter slot of the plan's path."""

    __slots__ = ("plan", "backend", "workspace", "variant", "fallback", "slot")

    def __init__(self, plan: Plan, backend: base.Backend, workspace: base.Workspace, slot: int):
        self.plan, self.backend, self.workspace, self.slot = plan, backend, workspace, slot
        self.variant, self.fallback = plan.variant, plan.fallback


class Executor:
    """Owns one fusion object's state. Collective to construct: every rank of ``group`` must build it together."""

    def __init__(self, group, capacity: Capacity, requested: str = policy.AUTO, strict: Optional[bool] = None,
                 table_path=None, caps: Optional[GroupCaps] = None):
        self.group = group
        self.capacity = capacity
        self.requested = requested
        self.strict_arg = strict
        self.counters = Counters()
        self.slot_counts = self.counters.slot_counts  # run() counts each call here: one list item += 1
        self.closed = False
        self.backends: Dict[str, base.Backend] = {b.name: b for b in base.registered()}
        self.workspaces: Dict[str, base.Workspace] = {}
        self.disabled: Dict[str, str] = {}
        self.caps = caps if caps is not None else group_caps(group, capacity.device)
        self.out_of_step: Optional[str] = None  # set when a backend failed on this rank but not on every rank
        # Every rank builds its fusion objects in the same order, so (rank set, construction number, call number)
        # names one call identically on every rank (for the mid-call error vote).
        ranks = vote.group_ranks(group)
        _CONSTRUCTED[ranks] = self.serial = _CONSTRUCTED.get(ranks, 0) + 1
        self.calls = 0
        self._check_settings_agree()
        self.table_entry, self.table_source = self._match_table(table_path)
        self._note_group_restriction()
        try:
            self._prepare_until_stable()
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------------------------
    def _check_settings_agree(self) -> None:
        """Strict mode decides, per call, between raising and falling back before any collective: a rank that
        raises while its peers fall back would leave them waiting. ``ARFUSE_ALLOW_UNVERIFIED`` decides which paths
        plans may name, and plans are built per spec on first use, so it is read once, here, and kept in the
        agreed caps. Collective (one gather for both); raises ValueError on every rank alike."""
        mine = (resolve_strict(self.strict_arg), base.allow_unverified())
        every = vote.all_gather_object(mine, self.group)
        for i, what in enumerate(("strict mode", base.ALLOW_UNVERIFIED_ENV)):
            values = [e[i] for e in every]
            if len(set(values)) > 1:
                how = "strict=, arfuse.strict() or ARFUSE_STRICT" if i == 0 else "the environment"
                raise ValueError(f"AllReduceFusion: {what} differs across ranks {values} ({how}): set it the same "
                                 f"on every rank")
        self.caps = dataclasses.replace(self.caps, allow_unverified=mine[1])

    def _match_table(self, table_path):
        """The table entry all ranks use. Each rank matches its own files, then every rank takes rank 0's result,
        so ranks whose tables differ (e.g. per-host cache dirs) still plan alike. Collective."""
        cap, caps = self.capacity, self.caps
        found = (None, "priority")
        for table, source in ((tables.load_tuned(table_path), "tuned"), (tables.builtin_defaults(), "defaults")):
            if table is None:
                continue
            entry = table.match(tables.device_key(caps), caps.world_size, cap.dtype, cap.hidden_size)
            if entry is not None:
                found = (entry, source)
                break
        every = vote.all_gather_object(found, self.group)
        if any(f != every[0] for f in every):
            differ = [r for r, f in enumerate(every) if f != every[0]]
            reason = f"selection table differs on ranks {differ} from rank 0; all ranks use rank 0's"
            self.counters.count_fallback(reason)
            log_once(f"table-differs:{reason}", f"arfuse: {reason}")
        entry, source = every[0]
        if entry is not None and entry.scaled_from is not None:
            source = f"{source} (scaled from hidden {entry.scaled_from})"
        return entry, source

    def _note_group_restriction(self) -> None:
        restriction = policy.group_restriction(self.caps)
        if restriction is not None:
            self.counters.count_fallback(restriction)
            log_once(f"restriction:{restriction}", f"arfuse: {restriction}; only multi-host backends run",
                     logging.INFO)

    def _live_backends(self) -> Dict[str, base.Backend]:
        return {n: b for n, b in self.backends.items() if n not in self.disabled}

    def _segments(self, spec: FusionSpec, prepared_only: bool) -> List[policy.Segment]:
        live = self._live_backends()
        segments = policy.plan_segments(spec, self.capacity, self.caps, live, self.requested, self.table_entry,
                                        self.table_source)
        if prepared_only and any(plan.backend not in self.workspaces for _, _, plan in segments):
            # after construction no rank may prepare (collective) on its own: plan without the unprepared ones
            live = {n: b for n, b in live.items() if n in self.workspaces}
            segments = policy.plan_segments(spec, self.capacity, self.caps, live, self.requested,
                                            self.table_entry, self.table_source)
        return segments

    def _prepare_until_stable(self) -> None:
        """Prepare every backend a plan of any kind of call names (one spec of each kind), until the plans only name
        prepared backends. Plans per token count are then built per spec on first use, from prepared backends only
        (pure: every rank builds the same ones)."""
        self._prepare(REFERENCE)
        specs = catalogue()
        while True:
            needed = sorted({plan.backend for spec in specs for _, _, plan in self._segments(spec, False)}
                            - set(self.workspaces))
            if not needed:
                break
            for name in needed:
                self._prepare(name)
        self._reset_plans()

    def never_runs(self) -> Optional[str]:
        """Why no call of any kind would run the requested path (every plan a fallback), or None."""
        plans = [plan for spec in catalogue() for _, _, plan in self._segments(spec, True)]
        return plans[0].reason if plans and all(p.fallback for p in plans) else None

    def plan_table(self, spec: FusionSpec) -> List[Optional[Plan]]:
        """The plans of ``spec`` indexed by token count (built on first use)."""
        table = self.plans.get(spec.code)
        if table is None:
            table = self.plans[spec.code] = policy.expand(self._segments(spec, True), self.capacity.max_tokens)
        return table

    def _reset_plans(self) -> None:
        """Forget every plan and route (rebuilt on use from the live, prepared backends)."""
        self.plans: Dict[int, List[Optional[Plan]]] = {}  # by spec code
        self.routes: Dict[int, List[Optional[Route]]] = {}  # by spec code, then token count
        self.row_routes: Dict[tuple, Route] = {}  # MoE finalize: by (spec code, token count, expert rows)

    def route_table(self, spec: FusionSpec) -> List[Optional["Route"]]:
        """What :meth:`run` dispatches to, indexed by token count: each plan with its backend, workspace and
        counter slot resolved (built with the plans, dropped with them)."""
        made: Dict[int, Route] = {}
        table = []
        for plan in self.plan_table(spec):
            if plan is None:
                table.append(None)
                continue
            route = made.get(id(plan))
            if route is None:
                route = made[id(plan)] = Route(plan, self.backends[plan.backend], self.workspaces[plan.backend],
                                               self.counters.slot(plan.key))
            table.append(route)
        self.routes[spec.code] = table
        return table

    def rows_route(self, spec: FusionSpec, route: Route, num_tokens: int, rows: int) -> Route:
        """The route of a MoE finalize call that reads ``rows`` expert rows: ``route`` when its path takes them,
        else the plan selection makes for the problem with its rows (among the prepared paths), so a path that
        refuses them is never run and so never fails. Planned once per (spec, tokens, rows)."""
        key = (spec.code, num_tokens, rows)
        found = self.row_routes.get(key)
        if found is not None:
            return found
        cap = self.capacity
        problem = Problem(spec, num_tokens, cap.hidden_size, cap.dtype, cap.device.type, self.caps.world_size,
                          expert_rows=rows)
        found = route
        if route.plan.backend != REFERENCE and policy.why_not(route.backend, problem, self.caps,
                                                              route.variant) is not None:
            live = {n: b for n, b in self._live_backends().items() if n in self.workspaces}
            entry = self.table_entry
            preferred = entry.choices(num_tokens, cap.hidden_size * cap.itemsize) if entry is not None else ()
            plan = policy.select(problem, self.caps, live, self.requested, preferred, self.table_source)
            found = Route(plan, self.backends[plan.backend], self.workspaces[plan.backend],
                          self.counters.slot(plan.key))
        if len(self.row_routes) >= MAX_ROW_ROUTES:
            self.row_routes.clear()
        self.row_routes[key] = found
        return found

    def _prepare(self, name: str) -> None:
        backend = self.backends[name]
        ws, why = None, None
        try:
            ws = backend.prepare(self.capacity, self.caps, self.group)
        except Exception as e:  # any failure must become a vote, or the other ranks would wait forever
            why = f"{type(e).__name__}: {e}"
        ok, reason = (ws is not None, why)
        if backend.needs_prepare_vote:
            ok, reason = vote.agree(ok, why, self.group)
        if ok:
            self.workspaces[name] = ws
            return
        if ws is not None:
            ws.close()
        if name == REFERENCE:
            raise BackendError(f"arfuse: the reference backend failed to prepare: {reason}")
        self._disable(name, f"{name}: prepare failed on {reason}")
        if resolve_strict(self.strict_arg):
            raise FallbackError(name, self.disabled[name])

    def _disable(self, name: str, reason: str) -> None:
        self.disabled[name] = reason
        self.counters.count_fallback(reason)
        log_once(f"disable:{reason}", f"arfuse: backend {name} disabled, falling back: {reason}")

    # -- per call -------------------------------------------------------------------------------------------
    def plan(self, spec: FusionSpec, num_tokens: int) -> Plan:
        return self.plan_table(spec)[num_tokens]

    def run(self, spec: FusionSpec, call: FusedCall) -> None:
        """Dispatch one validated call. Collective."""
        if self.out_of_step is not None:
            raise BackendError(self.out_of_step)
        self.calls += 1
        n = call.num_tokens
        if n == 0:
            return
        routes = self.routes.get(spec.code)
        if routes is None:
            routes = self.route_table(spec)
        route = routes[n]
        if spec.prologue is MOE_FINALIZE:
            route = self.rows_route(spec, route, n, call.x.shape[0])
        if route.fallback:
            self._fallback(route.plan)
        try:
            route.backend.run(route.workspace, route.variant, spec, call)
        except PeerTimeoutError as e:
            self.counters.count_error(f"{route.plan.key}: {e}")
            raise
        except Exception as e:  # a backend bug or launch failure: never return its partial output as valid
            self._on_backend_error(route.plan, e)
            if call.inplace:
                # In place, the failed launch may already have overwritten the residual it had to read, so a
                # rerun could return a wrong result as valid. The backend is disabled; the caller must retry.
                raise BackendError(f"arfuse: {route.plan.key} failed in place (the residual may be partly "
                                   f"overwritten); later calls use the fallback: {e}") from e
            return self.run(spec, call)
        self.slot_counts[route.slot] += 1

    def _fallback(self, plan: Plan) -> None:
        if resolve_strict(self.strict_arg):
            raise FallbackError(policy.parse_request(self.requested)[0], plan.reason)
        self.counters.count_fallback(plan.reason)
        log_once(f"fallback:{plan.reason}", f"arfuse: falling back to {plan.backend}: {plan.reason}")

    def _on_backend_error(self, plan: Plan, error: Exception) -> None:
        reason = f"{plan.key} raised {type(error).__name__}: {error}"
        self.counters.count_error(reason)
        if plan.backend == REFERENCE or resolve_strict(self.strict_arg):
            raise BackendError(f"arfuse: {reason}") from error
        # Falling back and recomputing is safe only if every rank does it at this same call; otherwise this rank's
        # extra collective would pair with its peers' next call and every later result would be wrong.
        if not vote.all_ranks_join(f"{self.serial}/{self.calls}", self.group, self.capacity.timeout_s):
            self.out_of_step = (f"arfuse: {reason} on rank {self.caps.rank}, and not on every rank within "
                                f"{self.capacity.timeout_s:g} s: the ranks are out of step, so this fusion object "
                                f"can no longer be used (its peers' next call fails too): close it on every rank")
            self.counters.count_fallback(self.out_of_step)
            log_once(f"out-of-step:{reason}", self.out_of_step)
            raise BackendError(self.out_of_step) from error
        self._disable(plan.backend, reason)
        self._reset_plans()  # rebuilt on use, without the disabled backend
        logger.log(logging.DEBUG, "arfuse: plans rebuilt without %s", plan.backend)

    def input_buffer(self, spec: FusionSpec, num_tokens: int) -> Optional[torch.Tensor]:
        plan = self.plan_table(spec)[num_tokens]
        return self.workspaces[plan.backend].input_buffer(plan.variant, num_tokens)

    def raise_if_failed(self) -> None:
        for ws in self.workspaces.values():
            ws.raise_if_failed()
        for ws in self.workspaces.values():
            problem = ws.input_error()
            if problem:
                raise ValueError(problem)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reset_plans()
        for ws in self.workspaces.values():
            ws.close()
        self.workspaces.clear()
