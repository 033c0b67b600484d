"""No two arfuse modules import each other, directly or around a loop (every import statement counts, lazy ones
inside functions too): a module's dependencies are below it or beside it, never both. The one loop left is
recorded here with its reason, so a new one fails."""
from __future__ import annotations

from typing import Dict, List, Set

from tests.unit.test_layering import _package_files, imports, module_name

KNOWN = [  # (the loop's modules, sorted): why it stays
    (["arfuse.backends.base", "arfuse.backends.verification"],
     "base asks the record per check and the record lists the registered backends; both imports are lazy"),
]


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for path in _package_files():
        name = module_name(path)
        graph[name] = {t for t, _ in imports(name, path.read_text(), path.name == "__init__.py")}
    return graph


def loops(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_loops_but_the_known_one():
    assert sorted(loops(_graph())) == sorted(names for names, _ in KNOWN)


def test_the_loop_finder_finds_a_loop():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []
