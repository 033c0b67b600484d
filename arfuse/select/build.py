"""Write selection tables: entries from measured latencies (pure; used by ``arfuse tune`` and to build the
shipped defaults from committed benchmark results), the JSON document, merging and atomic saving.

>>> t = {1: {"a": 5.0, "b": 9.0}, 64: {"a": 20.0, "b": 19.9}, 2048: {"a": 400.0, "b": 200.0}}
>>> e = entry_from_timings(t, gpu="G", world_size=2, dtype="bfloat16", hidden_size=1024)
>>> [(r.max_tokens, r.backend) for r in e.ranges]
[(64, 'a'), (None, 'b')]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from arfuse.core import json_doc
from arfuse.select.table import FORMAT, VERSION, Entry, Range, Table, choice_text, parse_choice

# A path keeps its range while it is within this fraction of the fastest: fewer switches, and a switch never
# costs more than the noise of one measurement.
STICKY = 0.02


def _ranking(times: Mapping[str, float]) -> List[str]:
    return sorted(times, key=lambda p: (times[p], p))


def _alternatives(points: Sequence[Mapping[str, float]], winner: str) -> Tuple[str, ...]:
    """Every other path measured at all ``points``, by mean slowdown against each point's fastest."""
    common = set.intersection(*(set(t) for t in points)) - {winner}

    def slowdown(path: str) -> float:
        return sum(t[path] / min(t.values()) for t in points) / len(points)

    return tuple(sorted(common, key=lambda p: (slowdown(p), p)))


def entry_from_timings(timings: Mapping[int, Mapping[str, float]], *, gpu: Optional[str], world_size: int,
                       dtype: str, hidden_size: Optional[int], source: str = "",
                       sticky: float = STICKY) -> Entry:
    """An entry from ``timings[num_tokens][path] = µs`` (paths as ``"name"`` or ``"name/variant"``).

    Each measured token count goes to its fastest path, except that the previous winner is kept while it is
    within ``sticky`` of the fastest. A range ends at the last token count its path won; the last range is
    unbounded. Alternatives (used when the winner cannot run on a group) are ranked over the range's points.
    """
    sizes = sorted(n for n, t in timings.items() if t)
    if not sizes:
        raise ValueError("entry_from_timings: timings has no measured token count")
    runs: List[Tuple[str, List[int]]] = []
    for n in sizes:
        times = timings[n]
        best = _ranking(times)[0]
        current = runs[-1][0] if runs else None
        if current is not None and current in times and times[current] <= times[best] * (1 + sticky):
            best = current
        if best == current:
            runs[-1][1].append(n)
        else:
            runs.append((best, [n]))
    ranges = []
    for i, (path, points) in enumerate(runs):
        alternatives = _alternatives([timings[n] for n in points], path)
        bound = None if i == len(runs) - 1 else points[-1]
        ranges.append(Range(bound, None, tuple(parse_choice(p) for p in (path,) + alternatives)))
    return Entry(gpu=gpu, world_size=world_size, dtype=dtype, hidden_size=hidden_size, ranges=tuple(ranges),
                 source=source)


def timings_by_shape(measurements: Sequence[Mapping]) -> Dict[Tuple[str, int, str, int], Dict[int, Dict[str, float]]]:
    """Group benchmark measurements (dicts with gpu, world_size, dtype, hidden, tokens, path, kind, status, us)
    of arfuse's own paths that passed their check into ``{(gpu, world_size, dtype, hidden): {tokens: {path: µs}}}``.
    ``auto`` and the peers are left out: a table can only name paths arfuse can run."""
    out: Dict[Tuple[str, int, str, int], Dict[int, Dict[str, float]]] = {}
    for m in measurements:
        if m.get("kind") != "backend" or m.get("status") != "ok" or m.get("us") is None:
            continue
        shape = (str(m["gpu"]), int(m["world_size"]), str(m["dtype"]), int(m["hidden"]))
        out.setdefault(shape, {}).setdefault(int(m["tokens"]), {})[str(m["path"])] = float(m["us"])
    return out


def to_json(table: Table) -> Dict[str, Any]:
    """The JSON document for ``table`` (what :func:`parse` reads back)."""
    def range_json(r: Range, kind: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {kind: r.max_tokens if kind == "max_tokens" else r.max_bytes,
                               "backend": r.backend, "variant": r.variant}
        if len(r.choices) > 1:
            out["alternatives"] = [choice_text(c) for c in r.choices[1:]]
        return out

    def entry_json(e: Entry) -> Dict[str, Any]:
        kind = "max_bytes" if any(r.max_bytes is not None for r in e.ranges) else "max_tokens"
        out: Dict[str, Any] = {"gpu": e.gpu, "world_size": e.world_size, "dtype": e.dtype,
                               "hidden_size": e.hidden_size, "ranges": [range_json(r, kind) for r in e.ranges]}
        if e.source:
            out["source"] = e.source
        return out

    return {"format": FORMAT, "version": VERSION, "entries": [entry_json(e) for e in table.entries]}


def merged(table: Optional[Table], entries: Iterable[Entry], source: str) -> Table:
    """``table`` with ``entries`` added, each replacing the entry of the same key (others are kept), sorted."""
    new = list({e.key: e for e in entries}.values())  # a later entry of the same key wins
    keys = {e.key for e in new}
    kept = [e for e in (table.entries if table is not None else ()) if e.key not in keys]
    ordered = sorted(kept + new, key=lambda e: tuple(str(k) if k is not None else "" for k in e.key[:3])
                     + (e.hidden_size or 0,))
    return Table(entries=tuple(ordered), source=source)


def save(table: Table, path) -> Path:
    """Write ``table`` to ``path`` atomically (a reader never sees half a file). Not collective."""
    return json_doc.write(to_json(table), path)
