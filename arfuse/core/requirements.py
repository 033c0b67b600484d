"""The oldest torch, Triton and transformers this arfuse runs with (each measured: README "Supported versions",
``bench/versions.py``), and the one-line error a too-old one gets.

Versions are read from the installed distributions' metadata (nothing is imported) and compared on their release
numbers: a local or pre-release label (``2.13.0+cpu``, ``3.9.0rc1``) counts as its release.
"""
from __future__ import annotations

import importlib.metadata
import re
from typing import Optional, Tuple

from arfuse.core.errors import ArfuseError

MINIMUM = {"torch": "2.11", "triton": "3.6", "transformers": "4.57.6"}
WHO = {"torch": "arfuse needs", "triton": "arfuse's Triton kernels need", "transformers": "arfuse's HF model helpers need"}


class UnsupportedVersionError(ArfuseError):
    """An installed dependency is older than arfuse supports (the message is one line: package, found, needed)."""


def release(version: str) -> Tuple[int, ...]:
    """The release numbers of ``version`` (``"2.13.0+cpu"`` -> ``(2, 13, 0)``); ValueError if it has none.

    >>> release("2.13.0+cpu"), release("3.9.0rc1"), release("5.25")
    ((2, 13, 0), (3, 9, 0), (5, 25))
    """
    found = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not found:
        raise ValueError(f"release: not a version number: {version!r}")
    return tuple(int(part) for part in found.group(1).split("."))


def _padded(numbers: Tuple[int, ...]) -> Tuple[int, ...]:
    return numbers + (0,) * (3 - len(numbers))


def installed_version(package: str) -> Optional[str]:
    """The installed distribution's version, or None if it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def problem(package: str, found: Optional[str] = None) -> Optional[str]:
    """Why ``package`` at version ``found`` (default: the installed one) cannot be used, in one line, or None.
    A package not installed, or whose version cannot be read, is not this function's concern (None).

    >>> problem("triton", "3.2.0")
    "arfuse's Triton kernels need triton >= 3.6, found 3.2.0"
    >>> problem("triton", "3.9.0") is None
    True
    """
    if package not in MINIMUM:
        raise ValueError(f"requirements.problem: package must be one of {', '.join(MINIMUM)}, got {package!r}")
    found = installed_version(package) if found is None else found
    if found is None:
        return None
    try:
        too_old = _padded(release(found)) < _padded(release(MINIMUM[package]))
    except ValueError:
        return None
    return f"{WHO[package]} {package} >= {MINIMUM[package]}, found {found}" if too_old else None


def require(package: str, found: Optional[str] = None) -> None:
    """Raise :class:`UnsupportedVersionError` (one line) if ``package`` is older than arfuse supports."""
    reason = problem(package, found)
    if reason:
        raise UnsupportedVersionError(reason)
