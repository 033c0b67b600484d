"""Launch tables from launch sweeps (pure): per hidden size, the launch for each token range, and the table entries
(``arfuse.kernels.launch_table``) they make.

A sweep record is a dict with ``kernel`` (``epilogue`` or ``moe_finalize``), ``hidden``, ``kind``, ``tokens``,
``launch`` (the launch fields' values in :data:`launch_table.FIELDS` order) and ``us``. At each swept token count
every launch measured for all the swept kinds gets its worst ratio, over those kinds, to the fastest launch of
each; the least wins (ties: the launch swept first), except that the previous token count's launch is kept while
its ratio is within ``sticky`` of the winner's (fewer ranges, fewer compiled variants). A range ends at the last
token count its launch won; the last is unbounded.

>>> sweep = [dict(kernel="epilogue", hidden=64, kind="k", tokens=t, launch=l, us=u)
...          for t, l, u in ((1, [1, 4, 0], 2.0), (1, [2, 8, 0], 3.0), (64, [1, 4, 0], 9.0), (64, [2, 8, 0], 6.0))]
>>> choose(sweep, "epilogue")
{64: [(1, (1, 4, 0)), (None, (2, 8, 0))]}
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from arfuse.kernels import launch_table

STICKY = 0.01
Ranges = List[Tuple[Optional[int], tuple]]


def fields(kernel: str, launch: Sequence) -> dict:
    """A launch's values (in :data:`launch_table.FIELDS` order) as the table's named fields."""
    return dict(zip(launch_table.FIELDS[kernel], launch))


def worst_ratios(sweep: Sequence[dict]) -> Dict[int, Dict[tuple, float]]:
    """``{tokens: {launch: worst ratio to the fastest launch over the kinds}}`` for one kernel and hidden size,
    counting only launches measured for every kind swept at that token count."""
    best: Dict[tuple, float] = {}
    for m in sweep:
        key = (m["kind"], m["tokens"])
        best[key] = min(best.get(key, float("inf")), m["us"])
    kinds: Dict[int, set] = {}
    for kind, tokens in best:
        kinds.setdefault(tokens, set()).add(kind)
    seen: Dict[Tuple[int, tuple], Dict[str, float]] = {}
    for m in sweep:
        seen.setdefault((m["tokens"], tuple(m["launch"])), {})[m["kind"]] = m["us"] / best[(m["kind"], m["tokens"])]
    out: Dict[int, Dict[tuple, float]] = {}
    for (tokens, launch), ratios in seen.items():
        if set(ratios) == kinds[tokens]:
            out.setdefault(tokens, {})[launch] = max(ratios.values())
    return out


def choose(sweep: Sequence[dict], kernel: str, sticky: float = STICKY) -> Dict[int, Ranges]:
    """Per hidden size, ``[(max_tokens, launch), ...]`` for ``kernel``'s records in ``sweep``."""
    chosen: Dict[int, Ranges] = {}
    for hidden in sorted({m["hidden"] for m in sweep if m["kernel"] == kernel}):
        records = [m for m in sweep if m["kernel"] == kernel and m["hidden"] == hidden]
        order = list(dict.fromkeys(tuple(m["launch"]) for m in records))
        runs: List[Tuple[tuple, List[int]]] = []
        for tokens, ratios in sorted(worst_ratios(records).items()):
            winner = min(ratios, key=lambda launch: (ratios[launch], order.index(launch)))
            current = runs[-1][0] if runs else None
            if current in ratios and ratios[current] <= ratios[winner] * (1 + sticky):
                winner = current
            if winner == current:
                runs[-1][1].append(tokens)
            else:
                runs.append((winner, [tokens]))
        if runs:
            chosen[hidden] = [(None if i == len(runs) - 1 else points[-1], launch)
                              for i, (launch, points) in enumerate(runs)]
    return chosen


def launch_at(ranges: Ranges, tokens: int) -> tuple:
    for bound, launch in ranges:
        if bound is None or tokens <= bound:
            return launch
    return ranges[-1][1]


def entries(doc: dict, anywhere: bool = False) -> List[launch_table.Entry]:
    """Launch-table entries from an ``arfuse bench --epilogue`` document: its per-range choice (``ranges``), or,
    in a document from before it had one, its single recommended epilogue launch per hidden size. The entries
    name the document's GPU and dtype, or with ``anywhere`` neither (they then apply to any)."""
    machine = doc.get("machine") or {}
    gpu = None if anywhere else doc.get("gpu") or next(iter(machine.get("gpus") or []), None)
    dtype = None if anywhere else doc["config"]["dtype"]
    source = (f"arfuse bench --epilogue, {gpu or next(iter(machine.get('gpus') or []), '?')} {doc['config']['dtype']}, "
              f"{machine.get('date', '?')}, arfuse {machine.get('git_commit', '?')}")
    found = []
    per_kernel = doc.get("ranges")
    if per_kernel is None:  # the first format: one launch (rows, num_warps, max_ctas) per hidden size
        per_kernel = {"epilogue": {h: [[None, r["launch"]]] for h, r in doc.get("recommended", {}).items()}}
    for kernel, by_hidden in sorted(per_kernel.items()):
        for hidden, ranges in sorted(by_hidden.items(), key=lambda kv: int(kv[0])):
            found.append(launch_table.make_entry(kernel, int(hidden), [(b, fields(kernel, launch)) for b, launch in ranges],
                                                 gpu=gpu, dtype=dtype, source=source))
    return found
