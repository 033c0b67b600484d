"""Selection tables: per-machine preferences by token range, read from JSON and validated (written by
:mod:`arfuse.select.build`).

Format (``arfuse tune`` writes it; ``arfuse/select/defaults.json`` ships the built-in one)::

    {"format": "arfuse-selection-table", "version": 1,
     "entries": [{"gpu": "NVIDIA H200", "world_size": 4, "dtype": "bfloat16", "hidden_size": 8192,
                  "ranges": [{"max_tokens": 64, "backend": "triton_symm", "variant": "lamport",
                              "alternatives": ["flashinfer/oneshot", "nccl"]},
                             {"max_tokens": null, "backend": "nccl", "variant": "default"}]}]}

An entry applies to one (GPU name - ``"cpu"`` for CPU groups -, world size, dtype, hidden size); ``gpu`` and
``hidden_size`` may be null (any). Ranges are ordered by an increasing bound, either ``max_tokens`` or
``max_bytes`` (tokens x hidden x itemsize) - one kind per entry - and the last may be unbounded (null).
``alternatives`` lists what to try next, fastest first, when the preferred path cannot run on this group.
Which entry applies: see :meth:`Table.match`.
Entries may carry ``source`` and ``comment`` strings; any other unknown field is an error (it is usually a typo).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from arfuse.core import json_doc, settings
from arfuse.core.counters import log_once
from arfuse.core.types import GroupCaps

FORMAT = "arfuse-selection-table"
VERSION = 1
DEFAULTS_PATH = Path(__file__).with_name("defaults.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Choice = Tuple[str, str]
_ENTRY_KEYS = {"gpu", "world_size", "dtype", "hidden_size", "ranges", "source", "comment"}
_RANGE_KEYS = {"max_tokens", "max_bytes", "backend", "variant", "alternatives"}


class TableError(ValueError):
    """A selection table file is malformed; the message names the file and the offending field."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_key(caps: GroupCaps) -> str:
    """What an entry's ``gpu`` field is matched against: the GPU name, or the device type ("cpu") when the
    group has no GPU name, so a table tuned on CPU never applies to a GPU group."""
    return caps.gpu_name or caps.device_type


def parse_choice(text: str) -> Choice:
    """``"name"`` or ``"name/variant"`` -> ``(name, variant)`` (variant ``"default"`` when omitted)."""
    name, _, variant = text.partition("/")
    return name, variant or "default"


def choice_text(choice: Choice) -> str:
    name, variant = choice
    return name if variant == "default" else f"{name}/{variant}"


@dataclass(frozen=True)
class Range:
    """Token counts up to a bound, and the paths to try for them, preferred first."""

    max_tokens: Optional[int]
    max_bytes: Optional[int]
    choices: Tuple[Choice, ...]

    @property
    def backend(self) -> str:
        return self.choices[0][0]

    @property
    def variant(self) -> str:
        return self.choices[0][1]

    def bound_tokens(self, bytes_per_token: int) -> Optional[int]:
        """The range's last token count for rows of ``bytes_per_token`` bytes (None: unbounded)."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.max_bytes is not None:
            return self.max_bytes // bytes_per_token
        return None


@dataclass(frozen=True)
class Entry:
    """The ranges for one (GPU, world size, dtype, hidden size); ``scaled_from``: the hidden size of the entry
    this one was scaled from (see :meth:`Table.match`)."""

    gpu: Optional[str]
    world_size: int
    dtype: str
    hidden_size: Optional[int]
    ranges: Tuple[Range, ...]
    source: str = ""
    scaled_from: Optional[int] = None

    @property
    def key(self) -> Tuple[Optional[str], int, str, Optional[int]]:
        return self.gpu, self.world_size, self.dtype, self.hidden_size

    def choices(self, num_tokens: int, bytes_per_token: int) -> Tuple[Choice, ...]:
        """The paths to try for ``num_tokens``, preferred first (empty past the last bounded range)."""
        for r in self.ranges:
            bound = r.bound_tokens(bytes_per_token)
            if bound is None or num_tokens <= bound:
                return r.choices
        return ()

    def choice(self, num_tokens: int, bytes_per_token: int) -> Optional[Choice]:
        found = self.choices(num_tokens, bytes_per_token)
        return found[0] if found else None

    def bounds(self, bytes_per_token: int) -> List[int]:
        return [b for b in (r.bound_tokens(bytes_per_token) for r in self.ranges) if b is not None]

    def scaled_to(self, hidden_size: int) -> "Entry":
        """This entry for another hidden size: token bounds become byte bounds, so crossovers keep their size
        in bytes (the transfer is what the paths' costs depend on)."""
        itemsize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        ranges = tuple(r if r.max_tokens is None else
                       Range(None, r.max_tokens * self.hidden_size * itemsize, r.choices) for r in self.ranges)
        return replace(self, hidden_size=hidden_size, ranges=ranges, scaled_from=self.hidden_size)


@dataclass(frozen=True)
class Table:
    entries: Tuple[Entry, ...]
    source: str

    def match(self, gpu: Optional[str], world_size: int, dtype: torch.dtype, hidden_size: int) -> Optional[Entry]:
        """The entry for this shape, or None. World size and dtype must be equal. Among entries whose GPU is
        ``gpu`` or null, the most specific wins: exact hidden size over null, then exact GPU over null. When
        none has this hidden size or null, the entry of the nearest hidden size (same GPU first) is scaled to
        it (see :meth:`Entry.scaled_to`)."""
        name = dtype_name(dtype)
        usable = [e for e in self.entries
                  if e.world_size == world_size and e.dtype == name and e.gpu in (None, gpu)]
        direct = [e for e in usable if e.hidden_size in (None, hidden_size)]
        if direct:
            best = max(direct, key=lambda e: ((e.hidden_size is not None) * 2 + (e.gpu is not None)))
            return best
        if not usable:
            return None
        nearest = min(usable, key=lambda e: (e.gpu is None, abs(math.log(e.hidden_size / hidden_size)),
                                             e.hidden_size))
        return nearest.scaled_to(hidden_size)


# -- parsing and validation ------------------------------------------------------------------------------------
def _field(obj: dict, key: str, types, where: str, optional: bool = False) -> Any:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise TableError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        kind = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise TableError(f"{where}: field {key!r} must be {kind}, got {value!r}")
    return value


def _positive(obj: dict, key: str, where: str, optional: bool = False) -> Optional[int]:
    value = _field(obj, key, int, where, optional)
    if value is not None and value <= 0:
        raise TableError(f"{where}: field {key!r} must be > 0, got {value}")
    return value


def _unknown_keys(obj: dict, allowed: set, where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise TableError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} (allowed: {sorted(allowed)})")


def _choice(text: Any, where: str) -> Choice:
    if not isinstance(text, str) or not text or text.count("/") > 1 or text.startswith("/") or text.endswith("/"):
        raise TableError(f"{where}: expected \"backend\" or \"backend/variant\", got {text!r}")
    return parse_choice(text)


def _parse_range(r: Any, where: str) -> Range:
    if not isinstance(r, dict):
        raise TableError(f"{where}: must be an object")
    _unknown_keys(r, _RANGE_KEYS, where)
    max_tokens = _positive(r, "max_tokens", where, optional=True)
    max_bytes = _positive(r, "max_bytes", where, optional=True)
    if max_tokens is not None and max_bytes is not None:
        raise TableError(f"{where}: give max_tokens or max_bytes, not both")
    backend = _field(r, "backend", str, where)
    variant = _field(r, "variant", str, where, optional=True) or "default"
    primary = _choice(f"{backend}/{variant}", where)
    alternatives = _field(r, "alternatives", list, where, optional=True) or []
    choices = [primary] + [_choice(a, f"{where}.alternatives[{k}]") for k, a in enumerate(alternatives)]
    return Range(max_tokens, max_bytes, tuple(dict.fromkeys(choices)))


def _check_order(ranges: List[Range], where: str) -> None:
    kinds = {"max_tokens" if r.max_tokens is not None else "max_bytes"
             for r in ranges if (r.max_tokens, r.max_bytes) != (None, None)}
    if len(kinds) > 1:
        raise TableError(f"{where}: mixes max_tokens and max_bytes bounds; use one kind per entry")
    previous = 0
    for j, r in enumerate(ranges):
        bound = r.max_tokens if r.max_tokens is not None else r.max_bytes
        if bound is None:
            if j != len(ranges) - 1:
                raise TableError(f"{where}.ranges[{j}]: only the last range may be unbounded")
            continue
        if bound <= previous:
            raise TableError(f"{where}.ranges[{j}]: bounds must increase ({bound} after {previous})")
        previous = bound


def _parse_entry(e: Any, where: str) -> Entry:
    if not isinstance(e, dict):
        raise TableError(f"{where}: must be an object")
    _unknown_keys(e, _ENTRY_KEYS, where)
    dtype = _field(e, "dtype", str, where)
    if dtype not in DTYPES:
        raise TableError(f"{where}: unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    raw_ranges = _field(e, "ranges", list, where)
    if not raw_ranges:
        raise TableError(f"{where}: 'ranges' is empty")
    ranges = [_parse_range(r, f"{where}.ranges[{j}]") for j, r in enumerate(raw_ranges)]
    _check_order(ranges, where)
    return Entry(gpu=_field(e, "gpu", str, where, optional=True), world_size=_positive(e, "world_size", where),
                 dtype=dtype, hidden_size=_positive(e, "hidden_size", where, optional=True),
                 ranges=tuple(ranges), source=_field(e, "source", str, where, optional=True) or "")


def parse(data: Any, source: str) -> Table:
    """Validate a decoded JSON document; raise :class:`TableError` naming the problem."""
    raw_entries = json_doc.entries(data, source, FORMAT, VERSION, TableError)
    entries = [_parse_entry(e, f"{source}: entries[{i}]") for i, e in enumerate(raw_entries)]
    json_doc.unique_keys(entries, lambda e: e.key, source, "gpu, world_size, dtype, hidden_size", TableError)
    return Table(entries=tuple(entries), source=source)


# -- files -----------------------------------------------------------------------------------------------------
def load(path) -> Table:
    """Read and validate a table file; raise :class:`TableError` (a ValueError) if it is unusable."""
    return parse(json_doc.read(path, TableError), str(path))


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> Table:
    return load(path)


def _load_if_changed(path: Path) -> Table:
    st = path.stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


def default_tune_path() -> Path:
    """Where ``arfuse tune`` writes and fusion objects read: ``ARFUSE_TUNE_FILE`` or the user's cache dir."""
    override = settings.text("ARFUSE_TUNE_FILE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "arfuse" / "tune.json"


def builtin_defaults() -> Table:
    """The shipped table (built from the committed benchmark results)."""
    return _load_if_changed(DEFAULTS_PATH)


def load_tuned(path=None) -> Optional[Table]:
    """The tuned table if one exists and is valid; a malformed one is logged once and ignored (the built-in
    defaults then apply). Not collective; the executor makes ranks agree on the entry they use."""
    path = Path(path) if path is not None else default_tune_path()
    try:
        return _load_if_changed(path)
    except FileNotFoundError:
        return None
    except (OSError, TableError) as e:
        log_once(f"table:{path}", f"arfuse: ignoring tuning table, using built-in defaults: {e}", logging.WARNING)
        return None
