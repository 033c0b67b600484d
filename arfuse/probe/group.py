"""Build the :class:`GroupCaps` that every rank of a group agrees on. Collective (over the CPU side)."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from arfuse.core.types import GroupCaps
from arfuse.probe import vote
from arfuse.probe.device import LocalDevice, local_device, peer_access


def _flashinfer_probe(device_type: str):
    if device_type != "cuda":
        return None
    from arfuse.probe import flashinfer_api  # imported lazily: the probe may import flashinfer

    return flashinfer_api.probe()


def _flashinfer_key(probe) -> Optional[tuple]:
    if probe is None:
        return None
    return (bool(getattr(probe, "available", False)), getattr(probe, "version", None), getattr(probe, "api", None))


def group_caps(group, device: torch.device) -> GroupCaps:
    """Probe every rank and combine conservatively: a capability holds only if it holds on every rank."""
    local = local_device(device)
    fi = _flashinfer_probe(device.type)
    facts: List[tuple] = vote.all_gather_object((local, _flashinfer_key(fi)), group)
    world = len(facts)
    me = vote.rank(group)
    locals_: List[LocalDevice] = [f[0] for f in facts]
    notes: List[str] = []

    hosts = [d.host for d in locals_]
    single_host = len(set(hosts)) == 1
    if not single_host:
        notes.append(f"single_host: ranks span hosts {sorted(set(hosts))}")

    names = {d.name for d in locals_}
    sms = {d.sm for d in locals_}
    p2p = False
    if device.type == "cuda" and single_host and all(d.index is not None for d in locals_):  # same on every rank
        ok, why = peer_access(local.index, [d.index for d in locals_])
        ok_all, reason = (ok, why) if world == 1 else vote.agree(ok, why, group)
        p2p = ok_all and world > 1
        if not ok_all:
            notes.append(f"p2p: {reason}")
    elif device.type == "cuda" and world > 1:
        notes.append("p2p: ranks are not on one host" if not single_host else "p2p: device index unknown")

    for r, d in enumerate(locals_):
        notes.extend(f"{n.split(':', 1)[0]}: rank {r}: {n.split(':', 1)[-1].strip()}" for n in d.notes)

    fi_keys = {f[1] for f in facts}
    if fi is not None and len(fi_keys) > 1:
        notes.append(f"flashinfer: ranks disagree on the installed FlashInfer {sorted(map(str, fi_keys))}")
        fi = _disagreeing(fi)

    return GroupCaps(
        world_size=world,
        rank=me,
        device_type=device.type,
        dist_backend=str(dist.get_backend(group)) if vote.is_distributed(group) else None,
        gpu_name=names.pop() if len(names) == 1 else ("mixed" if names else None),
        sm=sms.pop() if len(sms) == 1 else None,
        single_host=single_host,
        p2p=p2p,
        symm_mem=all(d.symm_mem for d in locals_),
        triton=all(d.triton for d in locals_),
        flashinfer=fi,
        notes=tuple(notes),
    )


def _disagreeing(fi):
    """A FlashInfer probe marked unavailable because ranks disagree (keeps the original for doctor)."""
    try:
        import dataclasses

        return dataclasses.replace(fi, available=False, reason="ranks disagree on the installed FlashInfer")
    except TypeError:
        return None
