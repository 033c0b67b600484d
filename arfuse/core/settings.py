"""Every ``ARFUSE_*`` environment setting, in one table, read by one parser.

A switch is on for ``1``, ``true``, ``yes`` or ``on`` and off for ``0``, ``false``, ``no`` or ``off`` (any case,
surrounding spaces ignored); unset or empty means its default. Any other word also means the default, and is
logged once on the ``arfuse`` logger (a typo never turns a switch the other way). Each setting is read where its
entry says (at import, per fusion object, per call), not cached here, so a test may set one before that point.

>>> switch("ARFUSE_FAST_PATH", {"ARFUSE_FAST_PATH": " Off "})
False
>>> switch("ARFUSE_STRICT", {"ARFUSE_STRICT": "maybe"})  # not a switch word: the default
False
>>> number("ARFUSE_TIMEOUT_S", {})
10.0
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Union

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One environment setting: its ``kind`` (``switch``, ``number`` or ``text``), default, when it is read and
    what it does (the README's list is this table)."""

    name: str
    kind: str
    default: Union[bool, float, str, None]
    read: str
    doc: str


SETTINGS: Dict[str, Setting] = {s.name: s for s in (
    Setting("ARFUSE_STRICT", "switch", False, "at import",
            "every fallback raises FallbackError (as arfuse.strict(True))"),
    Setting("ARFUSE_ALLOW_UNVERIFIED", "switch", False, "per fusion object (must be equal on every rank)",
            "run paths the verification record does not vouch for on the code installed here"),
    Setting("ARFUSE_FAST_PATH", "switch", True, "per fusion object",
            "the eager call's cheap acceptance test per argument (off: every call takes the full checks)"),
    Setting("ARFUSE_FAST_LAUNCH", "switch", True, "at import of arfuse.kernels._launch",
            "launch Triton kernels through the compiled kernel Triton returned (off: kernel[grid] every call)"),
    Setting("ARFUSE_TIMEOUT_S", "number", 10.0, "per fusion object (timeout_s=None)",
            "how long a kernel waits for a peer before recording PeerTimeoutError"),
    Setting("ARFUSE_VOTE_TIMEOUT_S", "number", 300.0, "per cross-rank vote",
            "how long a construction vote waits for the slowest rank"),
    Setting("ARFUSE_HOSTNAME", "text", None, "per group probe",
            "this host's name for the group probe (simulates multi-host groups in tests)"),
    Setting("ARFUSE_TUNE_FILE", "text", None, "per fusion object and arfuse tune",
            "the tuned selection table (default ~/.cache/arfuse/tune.json)"),
    Setting("ARFUSE_LAUNCH_FILE", "text", None, "per launch-table lookup",
            "this machine's kernel launch table (default ~/.cache/arfuse/launch.json)"),
    Setting("ARFUSE_RESULTS_DIR", "text", None, "per saved figure (tests, tools)",
            "where the reliability tests and tools write their JSON figures (unset: nothing written)"),
    Setting("ARFUSE_COMMIT", "text", None, "per verification run",
            "the commit recorded with GPU evidence (default: git rev-parse HEAD)"),
)}

_warned: set = set()


def _raw(name: str, environ: Optional[Mapping[str, str]]) -> str:
    if name not in SETTINGS:
        raise KeyError(f"arfuse settings: {name} is not a setting (see arfuse.core.settings.SETTINGS)")
    return (os.environ if environ is None else environ).get(name, "").strip()


def switch(name: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """The on/off setting ``name`` (see the module docstring for the words)."""
    value = _raw(name, environ).lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    default = bool(SETTINGS[name].default)
    if value and (name, value) not in _warned:
        _warned.add((name, value))
        logging.getLogger("arfuse").warning("arfuse: %s=%r is not one of %s or %s; using the default (%s)", name,
                                            value, "/".join(TRUE_WORDS), "/".join(FALSE_WORDS),
                                            "on" if default else "off")
    return default


def number(name: str, environ: Optional[Mapping[str, str]] = None) -> float:
    """The numeric setting ``name``, or its default when unset; ValueError naming it when it is not a number."""
    value = _raw(name, environ)
    if not value:
        return float(SETTINGS[name].default)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def text(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The text setting ``name``, or None when unset or empty."""
    return _raw(name, environ) or None


def readme_lines() -> str:
    """The settings as the README lists them (one markdown bullet each)."""
    return "\n".join(f"- `{s.name}` ({s.kind}, default {_shown(s.default)}; read {s.read}): {s.doc}"
                     for s in SETTINGS.values())


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return "unset" if default is None else f"{default:g}"
