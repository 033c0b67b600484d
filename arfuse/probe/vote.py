"""Cross-rank agreement over a group's CPU side: gather small Python objects and vote on outcomes.

These are the only collectives arfuse runs outside a backend's ``prepare`` and ``run``. They use a gloo group
with the same ranks (created once per rank set), so a vote never touches a GPU stream and works under NCCL.
"""
from __future__ import annotations

import datetime
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from arfuse.core import settings

_cpu_groups: Dict[Tuple[int, ...], Any] = {}
_lock = threading.Lock()


def vote_timeout() -> datetime.timedelta:
    """How long a vote waits for the slowest rank (``ARFUSE_VOTE_TIMEOUT_S``, default 300 s)."""
    return datetime.timedelta(seconds=settings.number("ARFUSE_VOTE_TIMEOUT_S"))


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and (group is None or group != dist.GroupMember.NON_GROUP_MEMBER)


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def group_ranks(group=None) -> Tuple[int, ...]:
    """Global ranks of ``group`` (WORLD when None)."""
    if not is_distributed(group):
        return (0,)
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD))


def cpu_group(group=None):
    """A group over the same ranks that accepts CPU objects: ``group`` itself if it is gloo-backed.

    Collective the first time it is called for a rank set (every member must call it).
    """
    if not is_distributed(group):
        return None
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend:
        return group
    ranks = group_ranks(group)
    with _lock:
        found = _cpu_groups.get(ranks)
    if found is None:
        found = dist.new_group(list(ranks), backend="gloo", timeout=vote_timeout(), use_local_synchronization=True)
        with _lock:
            _cpu_groups[ranks] = found
    return found


def all_ranks_join(tag: str, group, timeout_s: float) -> bool:
    """Whether every rank of ``group`` reaches this point for ``tag`` within ``timeout_s``. Only a rank whose
    backend failed mid-call enters it, so True means the failure happened on every rank at the same call and the
    ranks can fall back together; False (a rank never came) means they are out of step. Uses keys in the process
    group's store (unique per ``tag``), so nothing pairs with a later collective and no group is created."""
    if world_size(group) == 1:
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no store to meet in: assume the worst
        return False
    prefix = f"arfuse/failed/{','.join(map(str, group_ranks(group)))}/{tag}/"
    store.set(prefix + str(rank(group)), "1")
    try:
        store.wait([prefix + str(r) for r in range(world_size(group))], datetime.timedelta(seconds=float(timeout_s)))
    except Exception:  # the store's timeout: not every rank failed here
        return False
    return True


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """Every rank's ``obj``, in group-rank order. Collective."""
    if world_size(group) == 1:
        return [obj]
    out: List[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=cpu_group(group))
    return out


def agree(ok: bool, reason: Optional[str], group=None) -> Tuple[bool, Optional[str]]:
    """All ranks learn whether every rank succeeded; if not, the first failing rank's reason, naming the rank.

    Collective. Returns ``(True, None)`` or ``(False, "rank R: reason")`` identically on every rank.
    """
    votes = all_gather_object((bool(ok), None if ok else str(reason)), group)
    for r, (rank_ok, rank_reason) in enumerate(votes):
        if not rank_ok:
            return False, f"rank {r}: {rank_reason}"
    return True, None
