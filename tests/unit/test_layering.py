"""The layout is the architecture: imports inside arfuse go down the layers only (API -> selection -> backend ->
kernel, with probe and core at the bottom). Every import statement counts, including lazy ones inside functions.

A new top-level module or package must be placed in LAYERS deliberately; an upward edge fails the test and is
for the lead to resolve, never to allow here.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

import arfuse

PACKAGE_DIR = Path(arfuse.__file__).resolve().parent

# Lowest first. Modules in one tuple share a layer and may import each other.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("arfuse.core",),                        # types, errors, counters, validation: imports nothing else of arfuse
    ("arfuse.probe",),                       # what the device, group and installed packages can do
    ("arfuse.kernels",),                     # Triton kernels and their launch configuration
    ("arfuse.backends",),                    # the Backend contract and every path
    ("arfuse.select",),                      # pure selection and tuning tables
    ("arfuse.runtime",),                     # executor and the torch.library op
    ("arfuse.api",),                         # the public fusion object
    ("arfuse.functional", "arfuse.module",   # one-off functions and the nn.Module drop-in;
     "arfuse.fusions"),                      # the fusion objects they and arfuse.compile make for callers
    ("arfuse.autofuse",),                    # arfuse.compile: the Inductor pass fusing existing models
    ("arfuse",),                             # the package's public surface (__init__)
    ("arfuse.verify", "arfuse.launch",       # float64 oracle and the rank launcher, for tools and tests;
     "arfuse.testing"),                      # fault injection and figures for the reliability tests
    ("arfuse.bench", "arfuse.models"),       # benchmark/tuning runner; the demo TP model
    ("arfuse.cli", "arfuse.__main__"),       # the command line (also as python -m arfuse), on top of everything
)
NOT_PART_OF_THE_PACKAGE: set = set()  # pytest's doctest wiring is the repository's conftest.py, not shipped


def layer_of(module: str) -> Optional[int]:
    """The layer index of ``module`` (longest matching prefix), or None if LAYERS does not place it."""
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = PACKAGE_DIR.parent / rel
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(module: str, source: str, is_package: bool = False) -> Iterator[Tuple[str, int]]:
    """Every arfuse module ``source`` imports, with the line: ``from X import a`` counts as ``X.a`` when that is a
    module, else as ``X``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "arfuse" or target.startswith("arfuse."):
                yield target, node.lineno


def upward_edges(module: str, source: str, is_package: bool = False) -> List[str]:
    """The imports of ``module`` that point to a higher layer (or to a module LAYERS does not place)."""
    own = layer_of(module)
    bad = []
    for target, line in imports(module, source, is_package):
        theirs = layer_of(target)
        if own is None or theirs is None:
            bad.append(f"{module}:{line} -> {target}: not placed in LAYERS")
        elif theirs > own:
            bad.append(f"{module}:{line} -> {target}: layer {LAYERS[theirs][0]} is above {LAYERS[own][0]}")
    return bad


def _package_files() -> List[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if module_name(p) not in NOT_PART_OF_THE_PACKAGE)


def test_every_module_is_placed_in_a_layer():
    unplaced = [module_name(p) for p in _package_files() if layer_of(module_name(p)) is None]
    assert not unplaced, f"place these in LAYERS (tests/unit/test_layering.py): {unplaced}"


def test_imports_only_go_down_the_layers():
    violations = []
    for path in _package_files():
        violations += upward_edges(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not violations, "upward imports:\n" + "\n".join(violations)


@pytest.mark.parametrize("module, source, expected", [
    ("arfuse.core.types", "from arfuse.api import AllReduceFusion", ["arfuse.api"]),
    ("arfuse.select.policy", "def f():\n    from arfuse.runtime import executor", ["arfuse.runtime.executor"]),
    ("arfuse.backends.nccl", "from ..select import policy", ["arfuse.select.policy"]),
    ("arfuse.kernels.one_shot", "import arfuse", ["arfuse"]),
    ("arfuse.api", "from arfuse.select import policy\nfrom arfuse.core import types", []),
    ("arfuse.functional", "from arfuse import module", []),  # same layer
    ("arfuse.core.math", "from arfuse.nowhere import x", ["arfuse.nowhere"]),
])
def test_checker_flags_upward_and_unplaced_edges(module, source, expected):
    found = upward_edges(module, source)
    assert len(found) == len(expected), found
    for edge, target in zip(found, expected):
        assert f"-> {target}:" in edge
