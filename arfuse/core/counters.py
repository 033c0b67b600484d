"""Which path ran: per-object call/fallback counters, their process-wide sum, one-time logging, and the global
strict mode."""
from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from typing import Dict, Optional

logger = logging.getLogger("arfuse")

_strict_global = os.environ.get("ARFUSE_STRICT", "").strip().lower() in ("1", "true", "yes", "on")
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


def _retire(*tables: Dict[str, int]) -> None:
    """Fold a collected (or reset) Counters' tables into the process-wide totals."""
    with _registry_lock:
        for kind, table in zip(_KINDS, tables):
            _retired[kind].update(table)


class Counters:
    """Calls per path (``backend/variant``), fallbacks per reason and backend errors per reason.

    Every instance counts towards :func:`process_stats`; counting itself does no extra work (the sum is taken
    when asked for, and a collected instance's tables are folded into retired totals).
    """

    __slots__ = ("calls", "fallbacks", "errors", "__weakref__")

    def __init__(self) -> None:
        self.calls: Dict[str, int] = collections.Counter()
        self.fallbacks: Dict[str, int] = collections.Counter()
        self.errors: Dict[str, int] = collections.Counter()
        with _registry_lock:
            _live.add(self)
        weakref.finalize(self, _retire, self.calls, self.fallbacks, self.errors)

    def count_call(self, path: str) -> None:
        self.calls[path] += 1

    def count_fallback(self, reason: str, n: int = 1) -> None:
        self.fallbacks[reason] += n

    def count_error(self, reason: str) -> None:
        self.errors[reason] += 1

    def snapshot(self) -> StatsView:
        return StatsView(calls=dict(self.calls), fallbacks=dict(self.fallbacks), errors=dict(self.errors))

    def reset(self) -> None:
        """Zero this object's counters; the process-wide totals keep what they counted."""
        _retire(self.calls, self.fallbacks, self.errors)
        self.calls.clear()
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
