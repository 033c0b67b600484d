"""Build the :class:`GroupCaps` that every rank of a group agrees on. Collective (over the CPU side).

The group's own facts (hosts, GPU names and archs, peer access) are probed here; what a backend needs beyond them
comes from its :class:`~arfuse.probe.facts.FactSource` (registered with :func:`arfuse.probe.facts.contribute`),
gathered in the same collective and agreed by the source itself.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from arfuse.core.types import GroupCaps
from arfuse.probe import facts as fact_sources
from arfuse.probe import vote
from arfuse.probe.device import LocalDevice, local_device, peer_access
from arfuse.probe.facts import FactSource, LocalFacts


def group_caps(group, device: torch.device, sources: Optional[Sequence[FactSource]] = None) -> GroupCaps:
    """Probe every rank and combine conservatively: a capability holds only if it holds on every rank.
    ``sources``: the fact sources to gather (default: every registered one)."""
    sources = fact_sources.sources() if sources is None else list(sources)
    local = local_device(device)
    mine = {s.owner: _local(s, device) for s in sources}
    gathered: List[tuple] = vote.all_gather_object(
        (local, {owner: (f.summary(), f.notes) for owner, f in mine.items()}), group)
    locals_: List[LocalDevice] = [g[0] for g in gathered]
    notes: List[str] = []
    single_host = _single_host(locals_, notes)
    p2p = _p2p(device, local, locals_, single_host, group, notes)
    for r, d in enumerate(locals_):
        notes.extend(_per_rank(r, n) for n in d.notes)
    agreed = _agree(sources, mine, [g[1] for g in gathered], notes)
    names = {d.name for d in locals_}
    sms = {d.sm for d in locals_}
    return GroupCaps(
        world_size=len(gathered),
        rank=vote.rank(group),
        device_type=device.type,
        dist_backend=str(dist.get_backend(group)) if vote.is_distributed(group) else None,
        gpu_name=names.pop() if len(names) == 1 else ("mixed" if names else None),
        sm=sms.pop() if len(sms) == 1 else None,
        single_host=single_host,
        p2p=p2p,
        facts=agreed,
        notes=tuple(dict.fromkeys(notes)),  # two sources may note the same missing fact
    )


def _local(source: FactSource, device: torch.device) -> LocalFacts:
    try:
        return source.local(device)
    except Exception as e:  # a source must never break the probe (and so the collective): its facts are missing
        return LocalFacts({}, (f"{source.owner}: probing failed: {type(e).__name__}: {e}",))


def _single_host(locals_: List[LocalDevice], notes: List[str]) -> bool:
    hosts = [d.host for d in locals_]
    if len(set(hosts)) == 1:
        return True
    notes.append(f"single_host: ranks span hosts {sorted(set(hosts))}")
    return False


def _p2p(device: torch.device, local: LocalDevice, locals_: List[LocalDevice], single_host: bool, group,
         notes: List[str]) -> bool:
    world = len(locals_)
    if device.type == "cuda" and single_host and all(d.index is not None for d in locals_):  # same on every rank
        ok, why = peer_access(local.index, [d.index for d in locals_])
        ok_all, reason = (ok, why) if world == 1 else vote.agree(ok, why, group)
        if not ok_all:
            notes.append(f"p2p: {reason}")
        return ok_all and world > 1
    if device.type == "cuda" and world > 1:
        notes.append("p2p: ranks are not on one host" if not single_host else "p2p: device index unknown")
    return False


def _per_rank(rank: int, note: str) -> str:
    """``"fact: text"`` as ``"fact: rank R: text"``."""
    return f"{note.split(':', 1)[0]}: rank {rank}: {note.split(':', 1)[-1].strip()}"


def _agree(sources: Sequence[FactSource], mine: Dict[str, LocalFacts], every: List[dict],
           notes: List[str]) -> Dict[str, Dict[str, object]]:
    """Each source's agreed facts, by owner; its per-rank notes and its own added to ``notes``."""
    agreed = {}
    for source in sources:
        theirs: List[Tuple[object, Tuple[str, ...]]] = [e.get(source.owner, ({}, ())) for e in every]
        for r, (_, rank_notes) in enumerate(theirs):
            notes.extend(_per_rank(r, n) for n in rank_notes)
        values, own = source.agree(mine[source.owner], [summary for summary, _ in theirs])
        agreed[source.owner] = dict(values)
        notes.extend(own)
    return agreed
