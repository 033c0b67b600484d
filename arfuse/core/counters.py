"""Which path ran: per-object call/fallback counters, their process-wide sum, one-time logging, and the global
strict mode."""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import Dict, List, Optional

from arfuse.core import settings

logger = logging.getLogger("arfuse")

_strict_global = settings.switch("ARFUSE_STRICT")
_logged: set = set()
_log_lock = threading.Lock()


class strict:
    """Turn every fallback into a :class:`~arfuse.FallbackError` (global switch; ``ARFUSE_STRICT=1`` sets it too).

    ``arfuse.strict(True)`` sets it for the rest of the process; ``with arfuse.strict(True): ...`` sets it for a
    block and restores the previous value. ``arfuse.strict.enabled()`` reads it.
    """

    def __init__(self, on: bool = True):
        global _strict_global
        if not isinstance(on, bool):
            raise TypeError(f"strict: on must be a bool, got {type(on).__name__}")
        self._previous = _strict_global
        _strict_global = on

    def __enter__(self) -> "strict":
        return self

    def __exit__(self, *exc) -> None:
        global _strict_global
        _strict_global = self._previous

    @staticmethod
    def enabled() -> bool:
        return _strict_global


def log_once(key: str, message: str, level: int = logging.WARNING) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process; return whether it was logged."""
    with _log_lock:
        if key in _logged:
            return False
        _logged.add(key)
    logger.log(level, message)
    return True


class StatsView(dict):
    """A snapshot of a fusion object's counters: a plain dict that prints as a small table."""

    def __str__(self) -> str:
        lines = ["arfuse path counters"]
        lines.append("  calls:" + ("" if self.get("calls") else " none"))
        for path, n in sorted(self.get("calls", {}).items()):
            lines.append(f"    {path:<32} {n}")
        lines.append("  fallbacks:" + ("" if self.get("fallbacks") else " none"))
        for reason, n in sorted(self.get("fallbacks", {}).items()):
            lines.append(f"    {n:>6}  {reason}")
        if self.get("errors"):
            lines.append("  errors:")
            for reason, n in sorted(self["errors"].items()):
                lines.append(f"    {n:>6}  {reason}")
        return "\n".join(lines)


_KINDS = ("calls", "fallbacks", "errors")
_live: "weakref.WeakSet[Counters]" = weakref.WeakSet()  # every Counters not yet collected
_retired: Dict[str, collections.Counter] = {kind: collections.Counter() for kind in _KINDS}
_registry_lock = threading.Lock()


def _retire(calls: Dict[str, int], fallbacks: Dict[str, int], errors: Dict[str, int], slot_names=(),
            slot_counts=()) -> None:
    """Fold a collected (or reset) Counters' tables into the process-wide totals."""
    with _registry_lock:
        for kind, table in zip(_KINDS, (calls, fallbacks, errors)):
            _retired[kind].update(table)
        for name, n in zip(slot_names, slot_counts):
            if n:
                _retired["calls"][name] += n


class Counters:
    """Calls per path (``backend/variant``), fallbacks per reason and backend errors per reason.

    Every instance counts towards :func:`process_stats`; counting itself does no extra work (the sum is taken
    when asked for, and a collected instance's tables are folded into retired totals). The executor counts its
    calls in preallocated slots (:meth:`slot`: one integer increment per call); ``calls`` merges them with what
    :meth:`count_call` counted.
    """

    __slots__ = ("_calls", "fallbacks", "errors", "slot_names", "slot_counts", "__weakref__")

    def __init__(self) -> None:
        self._calls: Dict[str, int] = collections.Counter()
        self.fallbacks: Dict[str, int] = collections.Counter()
        self.errors: Dict[str, int] = collections.Counter()
        self.slot_names: List[str] = []  # slot i counts calls of path slot_names[i]
        self.slot_counts: List[int] = []  # ... in slot_counts[i] (the list object never changes)
        with _registry_lock:
            _live.add(self)
        weakref.finalize(self, _retire, self._calls, self.fallbacks, self.errors, self.slot_names, self.slot_counts)

    @property
    def calls(self) -> Dict[str, int]:
        """Calls per path (a new dict)."""
        merged = dict(self._calls)
        for name, n in zip(self.slot_names, list(self.slot_counts)):
            if n:
                merged[name] = merged.get(name, 0) + n
        return merged

    def slot(self, path: str) -> int:
        """The index of ``path``'s slot in :attr:`slot_counts` (made on first use); ``slot_counts[i] += 1``
        counts one call."""
        with _registry_lock:
            if path in self.slot_names:
                return self.slot_names.index(path)
            self.slot_names.append(path)
            self.slot_counts.append(0)
            return len(self.slot_names) - 1

    def count_call(self, path: str) -> None:
        self._calls[path] += 1

    def count_fallback(self, reason: str, n: int = 1) -> None:
        self.fallbacks[reason] += n

    def count_error(self, reason: str) -> None:
        self.errors[reason] += 1

    def snapshot(self) -> StatsView:
        return StatsView(calls=self.calls, fallbacks=dict(self.fallbacks), errors=dict(self.errors))

    def reset(self) -> None:
        """Zero this object's counters; the process-wide totals keep what they counted."""
        counts = list(self.slot_counts)
        for i in range(len(counts)):
            self.slot_counts[i] -= counts[i]  # in place: calls counted meanwhile are kept
        _retire(self._calls, self.fallbacks, self.errors, list(self.slot_names), counts)
        self._calls.clear()
        self.fallbacks.clear()
        self.errors.clear()


def process_stats() -> StatsView:
    """Counters summed over every fusion object this process created, alive, closed or collected:
    ``{"calls": {path: n}, "fallbacks": {reason: n}, "errors": {reason: n}}`` (prints as a table)."""
    with _registry_lock:
        totals = {kind: collections.Counter(table) for kind, table in _retired.items()}
        live = list(_live)
    for counters in live:
        for kind in _KINDS:
            totals[kind].update(dict(getattr(counters, kind)))  # dict(): one atomic copy under the GIL
    return StatsView({kind: dict(sorted(table.items())) for kind, table in totals.items()})


def resolve_strict(strict_arg: Optional[bool]) -> bool:
    """A fusion object's strict flag: its own setting if given, else the global one at call time."""
    return _strict_global if strict_arg is None else strict_arg
