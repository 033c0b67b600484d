"""Launch tables: the launch shape of the NCCL path's kernels per (kernel, GPU, dtype, hidden size) and token range,
as data - shipped in ``arfuse/kernels/launch_table.json`` (written by ``arfuse tune --from-bench JSON
--write-defaults``) and per machine (``arfuse tune --epilogue`` or ``--from-bench`` without ``--write-defaults``),
the per-machine file read first.

Format::

    {"format": "arfuse-launch-table", "version": 1,
     "entries": [{"kernel": "epilogue", "gpu": "NVIDIA H200", "dtype": "bfloat16", "hidden_size": 4096,
                  "ranges": [{"max_tokens": 2048, "rows": 1, "num_warps": 8, "max_ctas": 528},
                             {"max_tokens": null, "rows": 2, "num_warps": 8, "max_ctas": 0, "evict_first": true}],
                  "source": "..."}]}

Each kernel's launch fields (:data:`FIELDS`): ``epilogue`` - ``rows`` per tile, ``num_warps``, ``max_ctas`` (0: one
CTA per tile) and ``evict_first`` (optional, default false: the summed rows and the residual loaded as
evict-first, the weight as evict-last); ``moe_finalize`` - ``block_h`` (columns per tile, a power of two: below
the row's width a token's columns are split over several tiles), ``num_warps``, ``max_ctas`` and ``slots``
(expert slots loaded per step: 1, 4 or 8). ``gpu`` and ``dtype`` may be null (any). Ranges have increasing
``max_tokens``; the last one is unbounded (null).

Which entry applies (:func:`lookup`): the per-machine file's, else the shipped one's; within a file, the entry of
this kernel and hidden size whose gpu and dtype are equal or null, an equal gpu first, then an equal dtype. None
applies: the kernel's default launch (``launch_config``). A malformed per-machine file is reported once and
ignored; a malformed shipped one raises. Ranks of one job must read the same table: the MoE finalize launches
give the same bits, but epilogue launches of other tile shapes or warp counts may sum a row's squares in another
order (ranks on several machines: the same per-machine file, or none).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from arfuse.core import json_doc
from arfuse.core.counters import log_once

FORMAT = "arfuse-launch-table"
VERSION = 1
DEFAULTS_PATH = Path(__file__).with_name("launch_table.json")
PATH_ENV = "ARFUSE_LAUNCH_FILE"

_WARPS = (1, 2, 4, 8, 16, 32)


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# kernel -> field -> (required, check, what the check wants)
FIELDS: Dict[str, Dict[str, Tuple[bool, Callable[[Any], bool], str]]] = {
    "epilogue": {
        "rows": (True, _power_of_two, "a power of two"),
        "num_warps": (True, lambda v: v in _WARPS, f"one of {_WARPS}"),
        "max_ctas": (True, lambda v: v >= 0, ">= 0"),
        "evict_first": (False, lambda v: isinstance(v, bool), "true or false"),
    },
    "moe_finalize": {
        "block_h": (True, lambda v: _power_of_two(v) and v >= 16, "a power of two >= 16"),
        "num_warps": (True, lambda v: v in _WARPS, f"one of {_WARPS}"),
        "max_ctas": (True, lambda v: v >= 0, ">= 0"),
        "slots": (True, lambda v: v in (1, 4, 8), "1, 4 or 8"),
    },
}
_ENTRY_KEYS = {"kernel", "gpu", "dtype", "hidden_size", "ranges", "source"}

Launch = Dict[str, Any]  # a range's launch fields


class LaunchTableError(ValueError):
    """A launch table file is malformed; the message names the file and the offending field."""


@dataclass(frozen=True)
class Entry:
    kernel: str
    gpu: Optional[str]
    dtype: Optional[str]
    hidden_size: int
    ranges: Tuple[Tuple[Optional[int], Tuple[Tuple[str, Any], ...]], ...]  # (max_tokens, launch items)
    source: str = ""

    @property
    def key(self) -> Tuple[str, Optional[str], Optional[str], int]:
        return self.kernel, self.gpu, self.dtype, self.hidden_size

    def launches(self) -> Tuple[Tuple[Optional[int], Launch], ...]:
        return tuple((bound, dict(items)) for bound, items in self.ranges)


@dataclass(frozen=True)
class Table:
    entries: Tuple[Entry, ...]
    source: str

    def match(self, kernel: str, hidden: int, dtype: Optional[str], gpu: Optional[str]) -> Optional[Entry]:
        found = [e for e in self.entries if e.kernel == kernel and e.hidden_size == hidden
                 and e.gpu in (None, gpu) and e.dtype in (None, dtype)]
        return max(found, key=lambda e: (e.gpu is not None, e.dtype is not None), default=None)


def make_entry(kernel: str, hidden: int, ranges: Iterable[Tuple[Optional[int], Mapping[str, Any]]],
               gpu: Optional[str] = None, dtype: Optional[str] = None, source: str = "") -> Entry:
    """An entry from ``(max_tokens, launch fields)`` pairs, validated as a file's would be."""
    doc = {"kernel": kernel, "gpu": gpu, "dtype": dtype, "hidden_size": hidden, "source": source,
           "ranges": [{"max_tokens": bound, **launch} for bound, launch in ranges]}
    return _parse_entry(doc, f"{kernel} entry for hidden {hidden}")


# -- parsing ---------------------------------------------------------------------------------------------------
def _int(obj: Mapping, key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LaunchTableError(f"{where}: field {key!r} must be an integer, got {value!r}")
    return value


def _text(obj: Mapping, key: str, where: str) -> Optional[str]:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise LaunchTableError(f"{where}: field {key!r} must be a string or null, got {value!r}")
    return value


def _parse_range(kernel: str, r: Any, where: str) -> Tuple[Optional[int], Tuple[Tuple[str, Any], ...]]:
    if not isinstance(r, dict):
        raise LaunchTableError(f"{where}: must be an object")
    fields = FIELDS[kernel]
    extra = sorted(set(r) - set(fields) - {"max_tokens"})
    if extra:
        raise LaunchTableError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} for kernel {kernel!r} "
                               f"(allowed: max_tokens, {', '.join(fields)})")
    bound = r.get("max_tokens")
    if bound is not None and (_int(r, "max_tokens", where) <= 0):
        raise LaunchTableError(f"{where}: field 'max_tokens' must be > 0 or null, got {bound}")
    launch = {}
    for name, (required, check, wants) in fields.items():
        if name not in r:
            if required:
                raise LaunchTableError(f"{where}: missing field {name!r}")
            continue
        value = r[name]
        ok = isinstance(value, bool) if name == "evict_first" else (
            isinstance(value, int) and not isinstance(value, bool) and check(value))
        if not ok:
            raise LaunchTableError(f"{where}: field {name!r} must be {wants}, got {value!r}")
        launch[name] = value
    return bound, tuple(launch.items())


def _parse_entry(e: Any, where: str) -> Entry:
    if not isinstance(e, dict):
        raise LaunchTableError(f"{where}: must be an object")
    extra = sorted(set(e) - _ENTRY_KEYS)
    if extra:
        raise LaunchTableError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} "
                               f"(allowed: {sorted(_ENTRY_KEYS)})")
    kernel = e.get("kernel")
    if kernel not in FIELDS:
        raise LaunchTableError(f"{where}: field 'kernel' must be one of {sorted(FIELDS)}, got {kernel!r}")
    hidden = _int(e, "hidden_size", where)
    if hidden <= 0:
        raise LaunchTableError(f"{where}: field 'hidden_size' must be > 0, got {hidden}")
    raw = e.get("ranges")
    if not isinstance(raw, list) or not raw:
        raise LaunchTableError(f"{where}: field 'ranges' must be a non-empty list")
    ranges = tuple(_parse_range(kernel, r, f"{where}.ranges[{j}]") for j, r in enumerate(raw))
    previous = 0
    for j, (bound, _) in enumerate(ranges):
        last = j == len(ranges) - 1
        if (bound is None) != last:
            raise LaunchTableError(f"{where}.ranges[{j}]: only the last range is unbounded, and it must be "
                                   f"(max_tokens null)")
        if bound is not None and bound <= previous:
            raise LaunchTableError(f"{where}.ranges[{j}]: bounds must increase ({bound} after {previous})")
        previous = bound or previous
    return Entry(kernel, _text(e, "gpu", where), _text(e, "dtype", where), hidden, ranges,
                 _text(e, "source", where) or "")


def parse(data: Any, source: str) -> Table:
    """Validate a decoded JSON document; raise :class:`LaunchTableError` naming the problem."""
    raw = json_doc.entries(data, source, FORMAT, VERSION, LaunchTableError)
    entries = tuple(_parse_entry(e, f"{source}: entries[{i}]") for i, e in enumerate(raw))
    json_doc.unique_keys(entries, lambda e: e.key, source, "kernel, gpu, dtype, hidden_size", LaunchTableError)
    return Table(entries, source)


def load(path) -> Table:
    return parse(json_doc.read(path, LaunchTableError), str(path))


# -- writing ---------------------------------------------------------------------------------------------------
def to_json(table: Table) -> Dict[str, Any]:
    def entry_json(e: Entry) -> Dict[str, Any]:
        out = {"kernel": e.kernel, "gpu": e.gpu, "dtype": e.dtype, "hidden_size": e.hidden_size,
               "ranges": [{"max_tokens": bound, **launch} for bound, launch in e.launches()]}
        if e.source:
            out["source"] = e.source
        return out

    return {"format": FORMAT, "version": VERSION, "entries": [entry_json(e) for e in table.entries]}


def merged(table: Optional[Table], entries: Iterable[Entry], source: str) -> Table:
    """``table`` with ``entries`` added, each replacing the entry of the same key, sorted."""
    new = {e.key: e for e in entries}
    kept = [e for e in (table.entries if table is not None else ()) if e.key not in new]
    ordered = sorted(kept + list(new.values()),
                     key=lambda e: (e.kernel, e.gpu or "", e.dtype or "", e.hidden_size))
    return Table(tuple(ordered), source)


def save(table: Table, path) -> Path:
    """Write ``table`` to ``path`` atomically, then forget every cached lookup."""
    path = json_doc.write(to_json(table), path)
    reload()
    return path


def machine_path() -> Path:
    """The per-machine file: ``ARFUSE_LAUNCH_FILE``, else ``launch.json`` in the user's arfuse cache dir."""
    override = os.environ.get(PATH_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "arfuse" / "launch.json"


# -- lookup ----------------------------------------------------------------------------------------------------
_TABLES: Dict[str, Optional[Table]] = {}
_RESOLVED: Dict[tuple, Any] = {}
_GPU_NAMES: Dict[int, Optional[str]] = {}


def reload() -> None:
    """Forget the files read and every resolved lookup (after a table was written, or in tests)."""
    _TABLES.clear()
    _RESOLVED.clear()


def _tables() -> Tuple[Table, ...]:
    if "machine" not in _TABLES:
        path = machine_path()
        try:
            _TABLES["machine"] = load(path)
        except LaunchTableError as e:
            if path.exists():
                log_once(f"launch-table:{path}", f"arfuse: ignoring the launch table, using the shipped one: {e}",
                         logging.WARNING)
            _TABLES["machine"] = None
    if "shipped" not in _TABLES:
        _TABLES["shipped"] = load(DEFAULTS_PATH)
    return tuple(t for t in (_TABLES["machine"], _TABLES["shipped"]) if t is not None)


def gpu_name(device: int) -> Optional[str]:
    """The name of CUDA device ``device`` (None for -1: a CPU tensor)."""
    if device < 0:
        return None
    if device not in _GPU_NAMES:
        import torch

        _GPU_NAMES[device] = torch.cuda.get_device_name(device)
    return _GPU_NAMES[device]


def lookup(kernel: str, hidden: int, dtype: Optional[str], gpu: Optional[str]) -> Optional[Entry]:
    """The entry that applies (see the module docstring), or None."""
    for table in _tables():
        entry = table.match(kernel, hidden, dtype, gpu)
        if entry is not None:
            return entry
    return None


def ranges(kernel: str, hidden: int, dtype, device: int, make: Callable[[int, Launch], Any],
           default: Callable[[int], Any]):
    """``((max_tokens, make(hidden, launch fields)), ...)`` of the entry that applies to a ``dtype`` (torch dtype or
    None) tensor on CUDA device ``device`` (-1: CPU), or ``((None, default(hidden)),)`` where none does; cached
    until :func:`reload` (a launch's host cost is this dict lookup)."""
    key = (kernel, hidden, dtype, device)
    found = _RESOLVED.get(key)
    if found is None:
        name = str(dtype).replace("torch.", "") if dtype is not None else None
        entry = lookup(kernel, hidden, name, gpu_name(device))
        found = ((None, default(hidden)),) if entry is None else tuple(
            (b, make(hidden, launch)) for b, launch in entry.launches())
        _RESOLVED[key] = found
    return found


def pick(found, tokens: int):
    """The launch of the first range that holds ``tokens`` (the last is unbounded)."""
    for bound, launch in found:
        if bound is None or tokens <= bound:
            return launch
    return found[-1][1]
