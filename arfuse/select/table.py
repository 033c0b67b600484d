"""Selection tables: per-machine preferences by token range, loaded from JSON and validated.

Format (``arfuse tune`` writes it; ``arfuse/select/defaults.json`` ships the built-in one)::

    {"format": "arfuse-selection-table", "version": 1,
     "entries": [{"gpu": "NVIDIA H200", "world_size": 4, "dtype": "bfloat16", "hidden_size": 8192,
                  "ranges": [{"max_tokens": 64, "backend": "triton_symm", "variant": "lamport"},
                             {"max_tokens": null, "backend": "nccl", "variant": "default"}]}]}

``gpu`` and ``hidden_size`` may be null (matches any); a range bound may be ``max_tokens`` or ``max_bytes``
(null: unbounded). The most specific matching entry wins: exact hidden size over any, exact GPU over any.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from arfuse.core.counters import log_once

FORMAT = "arfuse-selection-table"
VERSION = 1
DEFAULTS_PATH = Path(__file__).with_name("defaults.json")


class TableError(ValueError):
    """A selection table file is malformed; the message names the file and the offending field."""


@dataclass(frozen=True)
class Range:
    max_tokens: Optional[int]
    max_bytes: Optional[int]
    backend: str
    variant: str

    def bound_tokens(self, bytes_per_token: int) -> Optional[int]:
        """The range's last token count for rows of ``bytes_per_token`` bytes (None: unbounded)."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.max_bytes is not None:
            return max(self.max_bytes // bytes_per_token, 0)
        return None


@dataclass(frozen=True)
class Entry:
    gpu: Optional[str]
    world_size: int
    dtype: str
    hidden_size: Optional[int]
    ranges: Tuple[Range, ...]

    def choice(self, num_tokens: int, bytes_per_token: int) -> Tuple[str, str]:
        for r in self.ranges:
            bound = r.bound_tokens(bytes_per_token)
            if bound is None or num_tokens <= bound:
                return r.backend, r.variant
        last = self.ranges[-1]
        return last.backend, last.variant

    def bounds(self, bytes_per_token: int) -> List[int]:
        return [b for b in (r.bound_tokens(bytes_per_token) for r in self.ranges) if b is not None]


@dataclass(frozen=True)
class Table:
    entries: Tuple[Entry, ...]
    source: str

    def match(self, gpu: Optional[str], world_size: int, dtype: torch.dtype, hidden_size: int) -> Optional[Entry]:
        """The most specific entry for this shape, or None."""
        name = dtype_name(dtype)
        best, best_score = None, -1
        for e in self.entries:
            if e.world_size != world_size or e.dtype != name:
                continue
            if e.gpu is not None and e.gpu != gpu:
                continue
            if e.hidden_size is not None and e.hidden_size != hidden_size:
                continue
            score = (e.hidden_size is not None) * 2 + (e.gpu is not None)
            if score > best_score:
                best, best_score = e, score
        return best


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _field(obj: dict, key: str, types, where: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise TableError(f"{where}: missing field {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, types) or isinstance(value, bool):
        raise TableError(f"{where}: field {key!r} must be {getattr(types, '__name__', types)}, got {value!r}")
    return value


def parse(data: Any, source: str) -> Table:
    """Validate a decoded JSON document; raise :class:`TableError` naming the problem."""
    if not isinstance(data, dict):
        raise TableError(f"{source}: top level must be a JSON object")
    if data.get("format") != FORMAT:
        raise TableError(f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise TableError(f"{source}: unsupported version {data.get('version')!r} (this arfuse reads {VERSION})")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise TableError(f"{source}: 'entries' must be a list")
    entries = []
    for i, e in enumerate(raw_entries):
        where = f"{source}: entries[{i}]"
        if not isinstance(e, dict):
            raise TableError(f"{where}: must be an object")
        ranges_raw = _field(e, "ranges", list, where)
        if not ranges_raw:
            raise TableError(f"{where}: 'ranges' is empty")
        ranges = []
        for j, r in enumerate(ranges_raw):
            rwhere = f"{where}.ranges[{j}]"
            if not isinstance(r, dict):
                raise TableError(f"{rwhere}: must be an object")
            ranges.append(Range(max_tokens=_field(r, "max_tokens", int, rwhere, optional=True),
                                max_bytes=_field(r, "max_bytes", int, rwhere, optional=True),
                                backend=_field(r, "backend", str, rwhere),
                                variant=_field(r, "variant", str, rwhere, optional=True) or "default"))
        dtype = _field(e, "dtype", str, where)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise TableError(f"{where}: unknown dtype {dtype!r}")
        entries.append(Entry(gpu=_field(e, "gpu", str, where, optional=True),
                             world_size=_field(e, "world_size", int, where), dtype=dtype,
                             hidden_size=_field(e, "hidden_size", int, where, optional=True),
                             ranges=tuple(ranges)))
    return Table(entries=tuple(entries), source=source)


def load(path) -> Table:
    """Read and validate a table file; raise :class:`TableError` (a ValueError) if it is unusable."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TableError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: not valid JSON ({e})") from None
    return parse(data, str(path))


def default_tune_path() -> Path:
    """Where ``arfuse tune`` writes and fusion objects read: ``ARFUSE_TUNE_FILE`` or the user's cache dir."""
    override = os.environ.get("ARFUSE_TUNE_FILE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "arfuse" / "tune.json"


def builtin_defaults() -> Table:
    return load(DEFAULTS_PATH)


def load_tuned(path=None) -> Optional[Table]:
    """The tuned table if one exists and is valid; a malformed one is logged once and ignored."""
    path = Path(path) if path is not None else default_tune_path()
    if not path.exists():
        return None
    try:
        return load(path)
    except TableError as e:
        log_once(f"table:{path}", f"arfuse: ignoring tuning table, using built-in defaults: {e}", logging.WARNING)
        return None
