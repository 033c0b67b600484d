"""The Inductor post-grad pass: match every entry of ``arfuse.autofuse.patterns`` with Inductor's pattern
matcher, replace what passes ``checks.why_not`` with the arfuse op of ``replace.REPLACEMENTS``, and record every
collective of the graph in the compile report."""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_graph_pattern

from arfuse.autofuse import explain, patterns, report
from arfuse.autofuse.checks import why_not
from arfuse.autofuse.replace import REPLACEMENTS
from arfuse.core.counters import logger

_SOURCES = ("patterns.py", "spellings.py", "tracing.py", "views.py", "checks.py", "replace.py", "graph_pass.py",
            "ops.py")


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """A digest of the modules that decide what a compiled graph contains."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()


class _GraphState:
    """What one graph's matching found: fused allreduces and the reasons matches were refused."""

    def __init__(self) -> None:
        self.fused: Dict[str, dict] = {}
        self.refused: Dict[str, List[str]] = {}


def _all_reduce_node(m: Match) -> Optional[torch.fx.Node]:
    return next((n for n in m.nodes if n.target is patterns.ALL_REDUCE), None)


def _check(entry: patterns.Entry, state: _GraphState, m: Match) -> bool:
    reason = why_not(entry, m.kwargs)
    if reason is None:
        return True
    node = _all_reduce_node(m)
    if node is not None and entry.norm is not None:  # a plain allreduce's refusal says nothing new
        reasons = state.refused.setdefault(node.name, [])
        if reason not in reasons:
            reasons.append(reason)
    return False


def _replace(entry: patterns.Entry, state: _GraphState, max_tokens: int, m: Match, *args, **kwargs) -> None:
    node = _all_reduce_node(m)
    replacement = REPLACEMENTS[entry.op]
    fn, inputs = replacement.build(m.kwargs, max_tokens)
    m.replace_by_example(fn, inputs)
    note = replacement.note(m.kwargs)
    state.fused[node.name] = {"into": entry.op, "pattern": entry.name, "notes": [note] if note else []}


def _graph_id(graph: torch.fx.Graph) -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "?"


def _kind(graph: torch.fx.Graph) -> str:
    names = [n.name for n in graph.find_nodes(op="placeholder")]
    return "backward" if any(name.startswith("tangents") for name in names) else "forward"


def _explained(node: torch.fx.Node) -> str:
    try:
        return explain.why_left_alone(node)
    except Exception as e:  # the report must never fail a compilation the pass left unchanged
        return f"left alone (no explanation: {type(e).__name__}: {e})"


def run(graph: torch.fx.Graph, max_tokens: int, source: str) -> dict:
    """Fuse what the patterns match in ``graph`` (in place) and record and return its report entry."""
    found = explain.collectives(graph)
    entry = {"graph": _graph_id(graph), "source": source, "kind": _kind(graph), "fused": 0, "collectives": [],
             "note": ""}
    if not found:
        entry["note"] = "no collectives: nothing to fuse"
        report.record(entry)
        return entry
    described = {n.name: explain.describe(n) for n in found}
    state = _GraphState()
    for stage in sorted({e.stage for e, _ in patterns.compiled_entries()}):
        matcher = PatternMatcherPass(pass_name=f"arfuse_autofuse_stage{stage}")
        for e, pattern in patterns.compiled_entries():
            if e.stage == stage:
                register_graph_pattern(pattern, extra_check=functools.partial(_check, e, state),
                                       pass_dict=matcher)(functools.partial(_replace, e, state, max_tokens))
        matcher.apply(graph)
    by_name = {n.name: n for n in graph.nodes}
    for name, info in described.items():
        fused = state.fused.get(name)
        if fused is not None:
            info.update(fused=True, reason=None, **fused)
        else:
            node = by_name[name]
            refused = state.refused.get(name)
            reason = "; ".join(refused) if refused else _explained(node)
            info.update(fused=False, into=None, pattern=None, reason=reason, notes=[])
        entry["collectives"].append(info)
    entry["fused"] = len(state.fused)
    report.record(entry)
    logger.log(logging.INFO, "arfuse.compile: graph %s of %s: fused %d of %d collectives", entry["graph"], source,
               entry["fused"], len(found))
    return entry


class FusionPass(CustomGraphPass):
    """The post-grad pass ``arfuse.compile`` installs for one compilation (Inductor option
    ``post_grad_custom_post_pass``). ``uuid`` covers the pattern and replacement code and ``max_tokens``, so
    Inductor's FX graph cache never serves a graph compiled by different patterns."""

    def __init__(self, max_tokens: int, source: str):
        self.max_tokens = max_tokens
        self.source = source
        patterns.compiled_entries()  # traced here, outside any compilation, once per process

    def __call__(self, graph: torch.fx.Graph) -> None:
        run(graph, self.max_tokens, self.source)

    def uuid(self) -> str:
        return f"arfuse-autofuse-{source_hash()}-max_tokens={self.max_tokens}"


class ChainedPass(CustomGraphPass):
    """The caller's own ``post_grad_custom_post_pass`` (one pass or a list of them) followed by arfuse's.
    ``uuid`` is None (no FX graph caching) when one of the caller's passes has none."""

    def __init__(self, first, second: FusionPass):
        self.first, self.second = first, second
        self._firsts = list(first) if isinstance(first, (list, tuple)) else [first]

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self._firsts:
            p(graph)
        self.second(graph)

    def uuid(self):
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self._firsts]
        return None if any(i is None for i in ids) else "+".join([*map(str, ids), self.second.uuid()])
