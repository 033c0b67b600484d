"""The compile report: per graph the fusion pass saw, each collective, whether it was fused and into what, and
for each one left alone the reason. Plain dicts (JSON-ready) that print as a table."""
from __future__ import annotations

import copy
import threading
from typing import List, Optional

_graphs: List[dict] = []
_lock = threading.Lock()


class CompileReport(dict):
    """``{"graphs": [{"graph", "source", "kind", "fused", "collectives": [...], "note"}, ...]}``; each
    collective: ``{"node", "op", "where", "shape", "dtype", "group", "fused", "into", "pattern", "reason",
    "notes"}``. ``str()`` gives a readable table (a graph whose outcome repeats an earlier one's, e.g. a
    recompile for new shapes, in one line)."""

    def __str__(self) -> str:
        graphs = self.get("graphs", [])
        if not graphs:
            return "arfuse compile report: no graph compiled by arfuse.compile yet"
        lines = ["arfuse compile report"]
        seen = {}
        for g in graphs:
            n = len(g["collectives"])
            head = f"  graph {g['graph']} ({g['kind']}) of {g['source']}: "
            key = _outcome(g)
            if key in seen:
                lines.append(f"{head}as graph {seen[key]}")
                continue
            seen[key] = g["graph"]
            lines.append(f"{head}{g['fused']} of {n} collectives fused" + (f"; {g['note']}" if g.get("note") else ""))
            for c in g["collectives"]:
                place = c["where"] or c["node"]
                if c["fused"]:
                    outcome = f"fused into {c['into']} [{c['pattern']}]"
                else:
                    outcome = f"left alone: {c['reason']}"
                lines.append(f"    {c['op']:<24} {place:<40} {outcome}")
                lines.extend(f"    {'':<24} {'':<40}   note: {note}" for note in c.get("notes", ()))
        return "\n".join(lines)


def _outcome(graph: dict) -> tuple:
    return (graph["kind"], graph["source"], graph.get("note"),
            tuple((c["op"], c["where"] or c["node"], c["fused"], c["into"], c["pattern"], c["reason"])
                  for c in graph["collectives"]))


def record(graph: dict) -> None:
    with _lock:
        _graphs.append(graph)


def compile_report(source: Optional[str] = None) -> CompileReport:
    """What the fusion pass did in every graph ``arfuse.compile`` compiled in this process (or only those of
    ``source``, the label ``arfuse.compile`` gave them: the model's class or the function's name)."""
    with _lock:
        graphs = [g for g in _graphs if source is None or g["source"] == source]
        return CompileReport(graphs=copy.deepcopy(graphs))


def clear() -> None:
    """Forget the recorded graphs."""
    with _lock:
        _graphs.clear()
