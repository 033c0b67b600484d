"""Regenerate ``flashinfer_api_signatures.json`` from downloaded FlashInfer releases (wheels or sdists).

Each release's ``flashinfer/comm/*.py`` is read with :mod:`ast` (nothing is imported, so no GPU, CUDA or
FlashInfer dependency is needed): every recorded function's parameter list as the source declares it, whether
``flashinfer/comm/__init__.py`` exports it, and the members of ``AllReduceFusionPattern``.

Usage (the archives are not committed; PyPI serves them)::

    pip download --no-deps flashinfer-python==0.7.4 -d /tmp/fi/0.7.4      # one directory per release
    python tests/unit/data/record_flashinfer_api.py /tmp/fi/*/*.whl /tmp/fi/*/*.tar.gz \\
        --merge tests/unit/data/flashinfer_api_signatures.json

``--merge FILE`` keeps FILE's other entries and its ``about`` text, replaces or adds the given releases and writes
the releases in version order; ``--check FILE`` exits 1 if FILE's entries for the given releases differ from what
the archives say (the way to confirm an existing entry was recorded faithfully).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

FUNCTIONS = ("create_allreduce_fusion_workspace", "allreduce_fusion",
             "trtllm_create_ipc_workspace_for_all_reduce_fusion", "trtllm_allreduce_fusion",
             "trtllm_moe_finalize_allreduce_fusion")
PATTERN_CLASS = "AllReduceFusionPattern"
ABOUT = ("Signatures of FlashInfer's allreduce-fusion API as released on PyPI / tagged upstream, one entry per "
         "version: the parameter list of each function in flashinfer.comm (as Python source declares it), whether "
         "flashinfer/comm/__init__.py exports it, and the members of AllReduceFusionPattern (a plain class with int "
         "attributes, not an Enum). A function missing from a version does not exist there.")
_NAME = re.compile(r"flashinfer[_-]python-(?P<version>[0-9][^-]*?)(?:-py3.*\.whl|\.tar\.gz)$")


# -- reading an archive -------------------------------------------------------------------------------------------
def version_of(archive: Path) -> str:
    """The release an archive holds, from its file name (``flashinfer_python-0.7.4-py3-none-any.whl``)."""
    match = _NAME.search(archive.name)
    if not match:
        raise ValueError(f"{archive}: not a flashinfer-python wheel or sdist name")
    return match.group("version")


def comm_sources(archive: Path) -> Dict[str, str]:
    """Module name (``allreduce``, ``__init__``) -> source of every ``flashinfer/comm/*.py`` in the archive."""
    out: Dict[str, str] = {}

    def keep(path: str, read) -> None:
        parts = path.split("/")
        if len(parts) >= 3 and parts[-3:-1] == ["flashinfer", "comm"] and parts[-1].endswith(".py"):
            out[parts[-1][:-3]] = read().decode("utf-8")

    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                keep(name, lambda name=name: zf.read(name))
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile():
                    keep(member.name, lambda member=member: tf.extractfile(member).read())
    if "__init__" not in out:
        raise ValueError(f"{archive}: no flashinfer/comm/__init__.py")
    return out


# -- rendering what the source declares ---------------------------------------------------------------------------
def _param(arg: ast.arg, default: Optional[ast.expr], prefix: str = "") -> str:
    text = prefix + arg.arg
    if arg.annotation is not None:
        text += ": " + ast.unparse(arg.annotation)
    if default is not None:
        text += (" = " if arg.annotation is not None else "=") + ast.unparse(default)
    return text


def render_signature(fn: ast.FunctionDef) -> str:
    """``(a: int, b=1, *, c: bool = False) -> None`` as ``inspect.signature`` would print the declaration."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults: List[Optional[ast.expr]] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    parts = [_param(arg, d) for arg, d in zip(positional, defaults)]
    if a.posonlyargs:
        parts.insert(len(a.posonlyargs), "/")
    if a.vararg is not None:
        parts.append(_param(a.vararg, None, "*"))
    elif a.kwonlyargs:
        parts.append("*")
    parts += [_param(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg is not None:
        parts.append(_param(a.kwarg, None, "**"))
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    return f"({', '.join(parts)}){returns}"


def render_patterns(cls: ast.ClassDef) -> str:
    """``bases=; kAllReduce=0, kARResidualRMSNorm=1, ...``: the class's bases and int members in order."""
    members = []
    for node in cls.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, int):
                members.append(f"{node.targets[0].id}={value.value}")
    return f"bases={', '.join(ast.unparse(b) for b in cls.bases)}; {', '.join(members)}"


def _exported(init: ast.Module) -> set:
    names = set()
    for node in ast.walk(init):
        if isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            if isinstance(node.value, (ast.List, ast.Tuple)):
                names.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return names


def _import_sources(init: ast.Module) -> Dict[str, str]:
    """Exported name -> the comm submodule ``__init__`` imports it from (``.allreduce`` -> ``allreduce``)."""
    out = {}
    for node in init.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                out[alias.asname or alias.name] = node.module.split(".")[0]
    return out


def _definitions(modules: Dict[str, ast.Module], name: str, kind) -> List[Tuple[str, ast.AST]]:
    return [(mod, node) for mod, tree in sorted(modules.items()) for node in tree.body
            if isinstance(node, kind) and node.name == name]


def record(sources: Dict[str, str]) -> dict:
    """One release's entry (the file's format) from its ``flashinfer/comm`` sources."""
    modules = {mod: ast.parse(src) for mod, src in sources.items()}
    exported, origin = _exported(modules["__init__"]), _import_sources(modules["__init__"])
    entry: dict = {}

    def pick(name, kind):
        found = _definitions(modules, name, kind)
        preferred = [f for f in found if f[0] == origin.get(name)]
        return (preferred or found or [(None, None)])[0][1]

    cls = pick(PATTERN_CLASS, ast.ClassDef)
    if cls is not None:
        entry[PATTERN_CLASS] = render_patterns(cls)
    for name in FUNCTIONS:
        fn = pick(name, (ast.FunctionDef, ast.AsyncFunctionDef))
        if fn is not None:
            entry[name] = render_signature(fn)
    # every recorded name gets a flag (False where the release lacks it), the class last
    entry["exported"] = {name: name in exported for name in sorted(FUNCTIONS) + [PATTERN_CLASS]}
    return entry


def _merged(old: dict, new: dict) -> dict:
    """``new`` in ``old``'s key order (new keys appended, ``exported`` last), so a regenerated file diffs small."""
    keys = [k for k in old if k in new and k != "exported"] + [k for k in new if k not in old and k != "exported"]
    entry = {k: new[k] for k in keys}
    flags = new["exported"]
    order = [k for k in old.get("exported", {}) if k in flags] + [k for k in flags if k not in old.get("exported", {})]
    entry["exported"] = {k: flags[k] for k in order}
    return entry


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 if p.startswith(("rc", "a", "b")) else 0
                 for p in re.split(r"[.]|(?<=\d)(?=[a-z])", version.replace("post", "")) if p != "")


def record_archives(archives: Iterable[Path]) -> Dict[str, dict]:
    return {version_of(a): record(comm_sources(a)) for a in archives}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archives", nargs="+", type=Path, help="flashinfer-python wheels (.whl) or sdists (.tar.gz)")
    ap.add_argument("--merge", type=Path, help="update this signatures file in place")
    ap.add_argument("--check", type=Path, help="compare with this signatures file; exit 1 on any difference")
    args = ap.parse_args(argv)
    recorded = record_archives(args.archives)
    if args.check:
        existing = json.loads(args.check.read_text())["versions"]
        diffs = [v for v, e in recorded.items() if existing.get(v) != e]
        for v in diffs:
            old = existing.get(v, {})
            keys = sorted(k for k in set(old) | set(recorded[v]) if old.get(k) != recorded[v].get(k))
            print(f"{v}: differs in {keys}")
        return 1 if diffs else 0
    if args.merge:
        data = json.loads(args.merge.read_text()) if args.merge.exists() else {"about": ABOUT, "versions": {}}
        versions = dict(data["versions"])
        versions.update({v: _merged(versions.get(v, {}), e) for v, e in recorded.items()})
        data["versions"] = {v: versions[v] for v in sorted(versions, key=_version_key)}
        args.merge.write_text(json.dumps(data, indent=1) + "\n")
        return 0
    json.dump(recorded, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
