"""FlashInfer workspaces shared per (group, dtype, device): created once every rank agrees, grown to a high-water
mark (never shrunk), reused while large enough; parked (kept for reuse) when its last user releases it, destroyed
when a larger one replaces it or by :meth:`WorkspaceManager.destroy_parked`.

Creation is the dangerous step: FlashInfer rendezvouses inside it, so a rank that fails *before* reaching the
rendezvous would leave its peers waiting. :meth:`WorkspaceManager.acquire` therefore runs three CPU-side votes
(:func:`arfuse.probe.vote.agree`): reuse or create; local preconditions (package, API path, call shapes) before
anyone calls FlashInfer; and the creation outcome. If any rank fails, every rank falls back together and the
reason names the first failing rank. What remains - a rank failing inside FlashInfer before its rendezvous - is
bounded by the process group's timeout.

Calls on one shared workspace must be stream-ordered (one stream per group, as engines run TP).
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from arfuse.backends import flashinfer_adapter as adapter
from arfuse.core.counters import log_once, resolve_strict
from arfuse.core.errors import BackendError, FallbackError
from arfuse.probe import flashinfer_api as fi_api
from arfuse.probe import vote
from arfuse.probe.flashinfer_api import FlashInferProbe

NAME = "flashinfer"
# arfuse pattern name -> FlashInfer AllReduceFusionPattern member it runs as
PATTERN_MEMBERS = {"ALLREDUCE": "kAllReduce", "RMSNORM": "kARResidualRMSNorm",
                   "RESIDUAL_RMSNORM": "kARResidualRMSNorm", "RESIDUAL_RMSNORM_FP8": "kARResidualRMSNormFP8Quant"}


class WorkspaceUnavailable(BackendError):
    """Every rank of the group could not get a FlashInfer workspace; ``reason`` names the first failing rank."""

    def __init__(self, reason: str):
        super().__init__(f"arfuse: no FlashInfer workspace: {reason}")
        self.reason = reason


@dataclass
class Shared:
    """A created workspace and how many fusion objects use it."""

    key: Tuple
    handle: adapter.Handle
    refs: int = 0
    suspect: bool = False  # a FlashInfer call on it raised: its flags may be out of step across ranks

    def fits(self, max_tokens: int, hidden: int, path: str) -> bool:
        # FlashInfer checks token_num * hidden_dim against the workspace; the unified API also validates the
        # hidden size in some releases, so only the legacy path (metadata passed by arfuse) reuses across hiddens
        same_hidden = self.handle.hidden == hidden or path == fi_api.LEGACY
        return (not self.handle.destroyed and not self.suspect and self.handle.path == path and same_hidden
                and self.handle.elements >= max_tokens * hidden)


def group_key(group) -> Tuple:
    name = getattr(group, "group_name", None) if group is not None else "WORLD"
    return (vote.group_ranks(group), name if isinstance(name, str) else id(group))


def is_subgroup(group) -> bool:
    """Whether ``group`` leaves out some rank of WORLD (FlashInfer must then be told the group)."""
    return vote.is_distributed(group) and vote.world_size(group) != dist.get_world_size()


def preflight(probe: FlashInferProbe, path: Optional[str], subgroup: bool) -> Optional[str]:
    """Why this rank cannot create and drive a workspace, checked without calling FlashInfer; None if it can."""
    if not probe.available:
        return probe.reason
    if path is None:
        scope = "subgroup" if subgroup else "world"
        return f"flashinfer {probe.version}: no API it can drive safely for a {scope} group ({'; '.join(probe.notes)})"
    missing = [m for m in set(PATTERN_MEMBERS.values()) if m not in probe.patterns]
    if missing:
        return f"flashinfer {probe.version}: {fi_api.PATTERN_CLASS} lacks {sorted(missing)}"
    create_name, fusion_name = fi_api.FUNCTIONS[path]
    try:
        adapter.resolve(create_name)
        adapter.resolve(fusion_name)
        values = adapter.create_values(path, rank=0, world=2, max_tokens=1, hidden=8, dtype=torch.bfloat16,
                                       group=None, flags=probe.flags(path))
        adapter.build_call(probe.functions[create_name], values)
        stub = adapter.Handle(path, 0, 2, 1, 8, torch.bfloat16, None, probe.functions[fusion_name], print,
                              probe.flags(path), metadata={})
        adapter.fusion_call(stub, pattern_code=0, oneshot=True, x=torch.empty(1, 8), allreduce_out=None,
                            residual_in=None, residual_out=None, norm_out=None, quant_out=None, gamma=None,
                            eps=1e-6, scale=None)
    except (LookupError, TypeError, ImportError) as e:
        return f"flashinfer {probe.version} ({path} API): {type(e).__name__}: {e}"
    return None


class WorkspaceManager:
    """Owns the shared FlashInfer workspaces of this process."""

    def __init__(self) -> None:
        self._current: Dict[Tuple, Shared] = {}
        self._high_water: Dict[Tuple, int] = {}
        self._lock = threading.Lock()
        self.failures: Dict[str, int] = collections.Counter()

    def acquire(self, group, *, dtype: torch.dtype, device: torch.device, max_tokens: int, hidden: int,
                probe: FlashInferProbe, strict: Optional[bool] = None) -> Shared:
        """A workspace fitting ``max_tokens`` x ``hidden`` of ``dtype`` for ``group``; call :meth:`release` when
        done. Collective over ``group``; not graph-safe. Raises :class:`WorkspaceUnavailable` on every rank if
        any rank fails (:class:`~arfuse.FallbackError` in strict mode)."""
        subgroup = is_subgroup(group)
        path = probe.path_for(subgroup) if probe.available else None
        # one workspace per hidden size on the unified API (it validates the hidden size), so a process using two
        # sizes does not replace, and leak, one with the other
        key = (group_key(group), dtype, device, None if path == fi_api.LEGACY else hidden)
        with self._lock:
            current = self._current.get(key)
            reusable = current is not None and current.fits(max_tokens, hidden, path)
            if reusable:
                current.refs += 1  # held across the vote, so destroy_parked() cannot take it meanwhile
        if vote.agree(reusable, "no reusable workspace", group)[0]:
            return current
        if reusable:
            self.release(current)  # another rank cannot reuse its copy: this one stays parked
        ok, reason = vote.agree(*self._ready(probe, path, subgroup), group)
        if not ok:
            self._fail(reason, strict)
        tokens = max(max_tokens, -(-self._high_water.get(key, 0) // hidden))
        handle, error = None, None
        try:
            handle = adapter.create(probe, path, rank=vote.rank(group), world=vote.world_size(group),
                                    max_tokens=tokens, hidden=hidden, dtype=dtype, group=group, device=device)
        except Exception as e:  # boundary: any failure must become a vote, or the other ranks fall out of step
            error = f"{type(e).__name__}: {e}"
        ok, reason = vote.agree(handle is not None, error, group)
        if not ok:
            if handle is not None:
                adapter.destroy(handle)
            self._fail(reason, strict)
        shared = Shared(key, handle, refs=1)
        with self._lock:
            previous = self._current.get(key)
            self._current[key] = shared
            self._high_water[key] = max(self._high_water.get(key, 0), handle.elements)
        if previous is not None and previous.refs == 0:
            adapter.destroy(previous.handle)
        return shared

    @staticmethod
    def _ready(probe: FlashInferProbe, path: Optional[str], subgroup: bool) -> Tuple[bool, Optional[str]]:
        why = preflight(probe, path, subgroup)
        return why is None, why

    def _fail(self, reason: str, strict: Optional[bool]) -> None:
        self.failures[reason] += 1
        log_once(f"flashinfer-workspace:{reason}", f"arfuse: FlashInfer workspace unavailable, every rank falls "
                 f"back: {reason}")
        if resolve_strict(strict):
            raise FallbackError(NAME, f"no FlashInfer workspace: {reason}")
        raise WorkspaceUnavailable(reason)

    def release(self, shared: Shared) -> None:
        """Drop one user. A superseded workspace is destroyed with its last user; the current one stays parked
        for the next fusion object of its group and hidden size: FlashInfer 0.7.2's ``destroy`` only drops Python
        references and its memory was never returned (40 MiB per create/close cycle on 4 H200s, 2026-11-28), so a
        serving process that rebuilds its fusion objects must reuse, not recreate. A workspace a FlashInfer call
        failed on (``suspect``) is never reused. :meth:`destroy_parked` destroys the parked ones."""
        with self._lock:
            shared.refs -= 1
            if shared.refs > 0:
                return
            if self._current.get(shared.key) is shared:
                if not shared.suspect:
                    return
                del self._current[shared.key]
        adapter.destroy(shared.handle)

    def destroy_parked(self) -> int:
        """Destroy every workspace no fusion object uses; returns how many. Not collective on FlashInfer >= 0.6;
        call it on every rank at once for older releases, whose destroy has a barrier."""
        with self._lock:
            parked = [k for k, sh in self._current.items() if sh.refs <= 0]
            handles = [self._current.pop(k).handle for k in parked]
        for handle in handles:
            adapter.destroy(handle)
        return len(handles)

    def live(self) -> Dict[Tuple, Any]:
        """Current workspaces by key (for tests and doctor)."""
        with self._lock:
            return dict(self._current)


MANAGER = WorkspaceManager()
