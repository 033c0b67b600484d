"""What the ``flashinfer`` backend needs of each rank, contributed to the group probe (``arfuse.probe.facts``):
``flashinfer``, the FlashInfer probe (:func:`arfuse.probe.flashinfer_api.probe`, CUDA only; None elsewhere),
marked unavailable when the ranks' installed FlashInfer differ. Read by the backend as ``caps.flashinfer``. Beside
``backends/flashinfer.py`` rather than in it: that module's code is part of the verification record's
fingerprint."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import torch

from arfuse.backends.flashinfer import NAME
from arfuse.probe.facts import FactSource, LocalFacts, contribute


def local_facts(device: torch.device) -> LocalFacts:
    """This rank's probe (kept here) and its key (what the other ranks see: available, version, API)."""
    if device.type != "cuda":
        return LocalFacts({"flashinfer": None})
    from arfuse.probe import flashinfer_api  # imported lazily: the probe may import flashinfer

    probe = flashinfer_api.probe()
    return LocalFacts({"flashinfer": probe}, shared=_key(probe))


def _key(probe) -> Optional[tuple]:
    if probe is None:
        return None
    return (bool(getattr(probe, "available", False)), getattr(probe, "version", None), getattr(probe, "api", None))


def agree(mine: LocalFacts, every: Sequence[Any]) -> Tuple[dict, Tuple[str, ...]]:
    """This rank's probe when every rank's key is the same; else the probe marked unavailable, with a note."""
    probe = mine.values.get("flashinfer")  # {} when this rank's probe failed
    if probe is None:  # not a CUDA group: not probed
        return {"flashinfer": None}, ()
    keys = set(every)
    if len(keys) <= 1:
        return {"flashinfer": probe}, ()
    note = f"flashinfer: ranks disagree on the installed FlashInfer {sorted(map(str, keys))}"
    return {"flashinfer": _disagreeing(probe)}, (note,)


def _disagreeing(probe):
    """A FlashInfer probe marked unavailable because ranks disagree (keeps the original for doctor)."""
    try:
        return dataclasses.replace(probe, available=False, reason="ranks disagree on the installed FlashInfer")
    except TypeError:
        return None


SOURCE = contribute(FactSource(NAME, local_facts, agree, names=("flashinfer",)))
