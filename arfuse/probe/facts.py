"""The hook through which a backend contributes what it needs to know of each rank to the group probe.

A backend's module registers a :class:`FactSource` at import (:func:`contribute`), beside its ``register``:
``local(device)`` says what this rank has (no collectives; never raises), ``agree`` combines every rank's into
the group's. :func:`arfuse.probe.group.group_caps` gathers every source's local facts with its own, in its one
collective, and the agreed facts land in :attr:`GroupCaps.facts <arfuse.core.types.GroupCaps>` under the
source's owner (a backend's name), where the backend's ``check_group`` reads them (``caps.fact(name)``). Adding a
backend thus touches its own module and its registration, never the core types or the probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from arfuse.core import requirements
from arfuse.core.types import DECLARED_FACTS
from arfuse.probe.device import has_module


@dataclass(frozen=True)
class LocalFacts:
    """One rank's facts: ``values`` (kept on this rank), ``notes`` (``"fact: why it is missing"``) and ``shared``
    (what the other ranks see of them, picklable; default: ``values``)."""

    values: Dict[str, Any]
    notes: Tuple[str, ...] = ()
    shared: Optional[Any] = None

    def summary(self) -> Any:
        return self.values if self.shared is None else self.shared


def agree_all(mine: LocalFacts, every: Sequence[Any]) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    """The default agreement over every rank's ``values``: a bool holds only if it holds on every rank; any other
    value is kept where every rank has the same, else None."""
    agreed = {}
    for name, value in mine.values.items():
        theirs = [facts.get(name) for facts in every]
        if isinstance(value, bool):
            agreed[name] = all(bool(v) for v in theirs)
        else:
            agreed[name] = value if all(v == value for v in theirs) else None
    return agreed, ()


@dataclass(frozen=True)
class FactSource:
    """What one backend contributes: ``owner`` (its name), ``local`` and ``agree`` (see the module docstring;
    ``agree(mine, every)`` gets this rank's :class:`LocalFacts` and every rank's ``summary()``, and returns the
    agreed values and any notes of its own). ``names``: the facts it contributes (readable as ``caps.<name>``)."""

    owner: str
    local: Callable[[torch.device], LocalFacts]
    agree: Callable[[LocalFacts, Sequence[Any]], Tuple[Dict[str, Any], Tuple[str, ...]]] = field(
        default=agree_all)
    names: Tuple[str, ...] = ()


def triton_facts(device: torch.device) -> LocalFacts:
    """``triton``: Triton is importable and at least the release arfuse needs (CUDA devices only; a fact of every
    backend whose kernels are Triton's). The note says which, in one line."""
    if device.type != "cuda":
        return LocalFacts({"triton": False})
    if not has_module("triton"):
        return LocalFacts({"triton": False}, ("triton: not installed",))
    too_old = requirements.problem("triton")
    return LocalFacts({"triton": too_old is None}, (f"triton: {too_old}",) if too_old else ())


_SOURCES: Dict[str, FactSource] = {}


def contribute(source: FactSource) -> FactSource:
    """Register ``source`` (replacing one of the same owner) and declare its fact names; return it."""
    _SOURCES[source.owner] = source
    DECLARED_FACTS.update(source.names)
    return source


def withdraw(owner: str) -> None:
    _SOURCES.pop(owner, None)


def sources() -> List[FactSource]:
    """The registered sources, in registration order."""
    return list(_SOURCES.values())
