"""Which paths are verified, as data: the record a verification run wrote (``verified.json`` beside this file),
checked against the code that is here now.

A path (``backend/variant``) is trusted for a :class:`~arfuse.core.spec.FusionSpec` only if the record holds
evidence for it whose features cover the spec's and whose source fingerprint equals the fingerprint of the code
that would run now. The fingerprint (:func:`fingerprint`) covers the modules the backend names for the variant
(``Backend.verified_sources``), every module of ``arfuse.kernels`` they import, and the values those modules read
from ``arfuse.core``; it hashes their syntax trees without docstrings, so comments, docstrings and formatting do
not count and any change to code does. A path whose code changed since its evidence is refused again as
unverified, with that reason, until a new run verifies it (``ARFUSE_ALLOW_UNVERIFIED=1`` runs it anyway).

Evidence entries (``record["paths"][path]`` is a list of them) hold: ``kind`` (``virtual_ranks``: W ranks on one
GPU; ``real_ranks``: one rank per GPU; ``one_gpu``: a single-rank path on one GPU), ``date``, ``device``, ``torch``,
``triton``, ``world_sizes`` (and ``any_world_size``, with its reason, for a path whose code does not depend on the
rank count), ``dtypes``, ``commit``, ``ok``, ``features`` (and ``features_by_world``, where they differ by world size), ``refused`` (specs that failed), ``cases``, ``results``
(where the run's files are) and ``sources`` (the fingerprint). A path is trusted for a call only at a world size
and dtype its evidence covers, and not at all while a failed run on its current code is recorded.
``record["components"]`` holds evidence for shared code that is not a path of its own (the symmetric-memory
sync protocol), under the same rule.
"""
from __future__ import annotations

import ast
import enum
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from arfuse.core import requirements

RECORD_PATH = Path(__file__).with_name("verified.json")
log = logging.getLogger("arfuse")
_WARNED: set = set()
FOLLOWED = ("arfuse.kernels",)  # imports followed into the fingerprint
READ_VALUES_FROM = ("arfuse.core",)  # modules whose imported values (constants, enums) are hashed, not their code
KINDS = ("real_ranks", "virtual_ranks", "one_gpu")


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"verification: no source for module {module!r}")
    return Path(spec.origin)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _canonical(node) -> str:
    """``node`` as text, the same on every Python version: node types and their non-empty fields (``ast.dump``
    differs between versions, e.g. 3.12's ``type_params=[]`` on every function)."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_canonical(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != []]
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return "[" + ", ".join(_canonical(item) for item in node) + "]"
    return repr(node)


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _imports(tree: ast.AST) -> List[Tuple[str, Tuple[str, ...]]]:
    """(module, names imported from it) for every import of an arfuse module in ``tree`` (names empty for a plain
    ``import`` and for a submodule imported from its package)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names if alias.name.startswith("arfuse")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("arfuse"):
            if node.level:
                raise ValueError("verification: relative imports are not followed; import arfuse modules by name")
            names = [alias.name for alias in node.names]
            subs = [n for n in names if _is_package(node.module) and
                    importlib.util.find_spec(f"{node.module}.{n}") is not None]
            found += [(f"{node.module}.{n}", ()) for n in subs]
            rest = tuple(n for n in names if n not in subs)
            if rest:
                found.append((node.module, rest))
    return found


def _value_digest(value) -> str:
    if isinstance(value, type) and issubclass(value, enum.Enum):
        return repr([(m.name, m.value) for m in value])
    if isinstance(value, tuple):  # as repr, with each item digested (a tuple of scalars reads as its repr)
        items = [_value_digest(v) for v in value]
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
    if isinstance(value, frozenset):  # sorted: a set's order (and so its repr) changes with the string hash seed
        return f"frozenset({{{', '.join(sorted(_value_digest(v) for v in value))}}})" if value else "frozenset()"
    if isinstance(value, (int, float, str, bool, type(None))):
        return repr(value)
    return f"<{type(value).__name__}>"  # a class or function of core: its name, not its code


@functools.lru_cache(maxsize=None)
def fingerprint(modules: Tuple[str, ...], follow: bool = True) -> Tuple[str, Tuple[str, ...]]:
    """(``sha256:...``, the files hashed) for ``modules`` and what they import (see the module docstring);
    ``follow=False``: ``modules`` alone, without the values they import."""
    seen: Dict[str, str] = {}
    values: Dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _source_path(name)
        tree = _strip_docstrings(ast.parse(path.read_text(), str(path)))
        seen[name] = _canonical(tree)
        for imported, names in _imports(tree) if follow else ():
            if imported.startswith(FOLLOWED) and imported not in seen:
                todo.append(imported)
            elif imported.startswith(READ_VALUES_FROM) and names:
                mod = importlib.import_module(imported)
                for n in names:
                    values[f"{imported}.{n}"] = _value_digest(getattr(mod, n, None))
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(f"{name}\n{seen[name]}\n".encode())
    for name in sorted(values):
        h.update(f"{name}={values[name]}\n".encode())
    files = tuple(sorted(str(_relative(_source_path(n))) for n in seen))
    return f"sha256:{h.hexdigest()}", files


def _relative(path: Path) -> Path:
    root = Path(__file__).resolve().parents[2]
    try:
        return path.resolve().relative_to(root)
    except ValueError:
        return path


@functools.lru_cache(maxsize=1)
def _record_cached(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def load(path: Optional[Path] = None) -> dict:
    """The record at ``path`` (default :data:`RECORD_PATH`; ``{"format": 1, "paths": {}, "components": {}}``, with
    one warning, if the file is missing: every GPU path is then unverified)."""
    path = RECORD_PATH if path is None else path
    if not path.exists():
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("arfuse: no verification record at %s: every GPU path counts as unverified", path)
        return {"format": 1, "paths": {}, "components": {}}
    return _record_cached(str(path), path.stat().st_mtime)


def current(evidence: Iterable[dict], sources: str) -> List[dict]:
    """The entries of ``evidence`` made on code with fingerprint ``sources``."""
    return [e for e in evidence if e.get("sources") == sources]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _minor(version: str) -> Tuple[int, ...]:
    try:
        return requirements.release(str(version))[:2]
    except ValueError:
        return ()


def same_release(a: str, b: str) -> bool:
    """Whether Triton versions ``a`` and ``b`` are one release (major.minor); unreadable ones only if equal."""
    ma, mb = _minor(a), _minor(b)
    return ma == mb if ma and mb else str(a) == str(b)


def _on_release(entry: dict, triton: str) -> bool:
    """Whether ``entry`` was made with Triton ``triton``'s release (an entry that names none covers every one)."""
    return not entry.get("triton") or same_release(entry["triton"], triton)


TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm")


@functools.lru_cache(maxsize=1)
def triton_version() -> Optional[str]:
    """The installed Triton's version: its distribution's, else ``triton.__version__``, else ``"unknown"`` (which
    matches no evidence); None if Triton is not installed."""
    for name in TRITON_DISTRIBUTIONS:
        found = requirements.installed_version(name)
        if found:
            return found
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton

        return str(getattr(triton, "__version__", None) or "unknown")
    except Exception:  # noqa: BLE001 - a broken install is an unknown version here (the probe says why)
        return "unknown"


def _features_at(entry: dict, world_size: Optional[int], dtype: Optional[str] = None) -> Iterable[str]:
    """The features ``entry`` vouches for at ``world_size`` in ``dtype`` (``features_by_world``, world size ->
    dtype -> features, where the run recorded it; older entries hold one list per world size, or none)."""
    by_world = entry.get("features_by_world")
    if world_size is None or not by_world or entry.get("any_world_size"):
        return entry["features"]
    at = by_world.get(str(world_size))
    if at is None:
        return ()
    if isinstance(at, dict):
        if dtype is None:
            return frozenset().union(*at.values())
        return at.get(dtype, ())
    return at


class Verdict:
    """What the record says of one path now: ``evidence`` made on the current code (``failed``: those of runs
    that failed, which refuse the path whatever else passed), ``stale`` entries (made on other code), and
    ``features`` vouched for on the current code (None: no passing evidence)."""

    def __init__(self, path: str, sources: str, files: Sequence[str], evidence: List[dict]):
        self.path, self.sources, self.files = path, sources, tuple(files)
        now = current(evidence, sources)
        self.failed = [e for e in now if not e.get("ok", True)]
        self.evidence = [e for e in now if e.get("ok", True)]
        self.stale = [e for e in evidence if e not in now and e.get("ok", True)]
        self.features = frozenset().union(*(e["features"] for e in self.evidence)) if self.evidence else None

    def reason(self, features: Iterable[str], spec_name: Optional[str] = None, world_size: Optional[int] = None,
               dtype=None, triton: Optional[str] = None) -> Optional[str]:
        """Why a spec needing ``features`` (named ``spec_name``) is not verified on this path at ``world_size`` in
        ``dtype``, or None. An entry covers the world sizes it ran, or every one if it says ``any_world_size`` (with
        the reason: the nccl path's kernels do not depend on it); an entry without a ``dtypes`` list (older runs)
        covers every dtype. With ``triton`` (the version here), an entry covers only the Triton release (major.minor)
        it ran with: another release compiles the same sources into other code."""
        if self.failed:
            e = self.failed[-1]
            problem = (e.get("problems") or ["see its results"])[0]
            return f"{self.path}: failed its check on this code ({e['kind']}, {e['date']}): {problem}"
        if self.features is None:
            if self.stale:
                newest = max(self.stale, key=lambda e: e.get("date", ""))
                return (f"{self.path}: its code changed since it was verified ({newest.get('kind')}, "
                        f"{newest.get('date')}, commit {str(newest.get('commit') or '?')[:10]}); not verified since")
            return f"{self.path}: never verified on GPUs"
        for e in self.evidence:
            if spec_name in e.get("refused", {}):
                return (f"{self.path}: {spec_name} failed its check ({e['kind']}, {e['date']}): "
                        f"{e['refused'][spec_name]}")
        matching = self.evidence
        if triton is not None:
            matching = [e for e in self.evidence if _on_release(e, triton)]
            if not matching:
                ran = sorted({str(e.get("triton")) for e in self.evidence})
                return (f"{self.path}: verified with Triton {', '.join(ran)}, not with this Triton {triton} (its "
                        f"compiler may build other code from the same sources)")
        name = None if dtype is None else _dtype_name(dtype)
        covering = [e for e in matching
                    if (world_size is None or e.get("any_world_size") or world_size in e.get("world_sizes", ()))
                    and (name is None or "dtypes" not in e or name in e["dtypes"])]
        if not covering:
            worlds = sorted({w for e in matching for w in e.get("world_sizes", ())})
            kinds = sorted({d for e in matching for d in e.get("dtypes", ())})
            with_triton = f" with Triton {triton}" if triton is not None else ""
            return (f"{self.path}: not yet verified at world size {world_size} in {name}{with_triton} (verified: "
                    f"world sizes {worlds}, dtypes {kinds or 'any'})")
        missing = sorted(set(features) - frozenset().union(*(_features_at(e, world_size, name) for e in covering)))
        if missing:
            at = f" at world size {world_size}" if world_size is not None else ""
            return f"{self.path}: {', '.join(missing)} not yet verified on GPUs{at}"
        return None


def verdict(path: str, modules: Tuple[str, ...], record: Optional[dict] = None) -> Verdict:
    """The :class:`Verdict` of ``path`` whose code is ``modules`` (and their imports)."""
    record = load() if record is None else record
    sources, files = fingerprint(tuple(modules))
    return Verdict(path, sources, files, record.get("paths", {}).get(path, []))


COMPONENTS = {"triton_symm/sync": ("arfuse.kernels._sync",)}  # shared code with evidence of its own


def component_verdict(name: str, record: Optional[dict] = None) -> Verdict:
    """The :class:`Verdict` of a shared component of :data:`COMPONENTS` (``record["components"]``): its own
    modules only, imports not followed."""
    record = load() if record is None else record
    sources, files = fingerprint(COMPONENTS[name], follow=False)
    return Verdict(name, sources, files, record.get("components", {}).get(name, []))


def add(record: dict, path: str, entry: dict, section: str = "paths") -> dict:
    """Add ``entry`` to ``record[section][path]``: it replaces the passing entries of its kind made on the same code
    with the same Triton release (a failed run on that code stays, whatever its Triton: it keeps refusing the path
    until the code changes), and of the entries made
    on other code (history) the newest of each kind stays."""
    kept = [e for e in record.setdefault(section, {}).get(path, [])
            if not (e.get("kind") == entry["kind"] and e.get("sources") == entry["sources"] and e.get("ok", True)
                    and same_release(e.get("triton"), entry.get("triton")))]
    history: Dict[str, dict] = {}
    for e in kept:
        if e.get("sources") != entry["sources"]:
            older = history.get(e["kind"])
            if older is None or e.get("date", "") >= older.get("date", ""):
                history[e["kind"]] = e
    same_code = [e for e in kept if e.get("sources") == entry["sources"]]
    record[section][path] = same_code + list(history.values()) + [entry]
    return record


def save(record: dict, path: Optional[Path] = None) -> None:
    """Write ``record`` (sorted keys) to ``path`` (default :data:`RECORD_PATH`)."""
    path = RECORD_PATH if path is None else path
    record.setdefault("format", 1)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    _record_cached.cache_clear()


def _evidence_text(e: dict) -> str:
    worlds = ",".join(str(w) for w in e.get("world_sizes", [])) + (" (holds at any W)" if e.get("any_world_size") else "")
    cases = e.get("cases")
    dtypes = f", {'/'.join(e['dtypes'])}" if e.get("dtypes") else ""
    failed = ""
    if not e.get("ok", True):  # what failed, in a few words (the record keeps the whole message)
        problem = (e.get("problems") or ["see its results"])[0].split(":")[0]
        failed = f"FAILED ({problem}): "
    triton = f", Triton {e['triton']}" if e.get("triton") else ""
    return (f"{failed}{e['kind'].replace('_', ' ')}, {e.get('device', '?')}{triton}, W={worlds}{dtypes}"
            f"{f', {cases} cases' if cases else ''}, {e.get('date', '?')} ({str(e.get('commit') or '?')[:10]})")


def verdicts(record: Optional[dict] = None) -> List[Verdict]:
    """The :class:`Verdict` of every registered path that needs evidence, then of every component."""
    from arfuse.backends.base import registered

    record = load() if record is None else record
    found = []
    for backend in registered():
        for variant in backend.variants:
            modules = backend.verified_sources(variant)
            if modules is not None:
                key = backend.name if variant in ("", "default") else f"{backend.name}/{variant}"
                found.append(verdict(key, modules, record))
    return found + [component_verdict(name, record) for name in COMPONENTS]


def summary(v: Verdict, triton: Optional[str] = None) -> dict:
    """One verdict as plain data: what is verified now, on what evidence, what went stale. With ``triton`` (the
    version installed here; ``doctor`` passes it), a path whose evidence is all on other Triton releases says so."""
    other = triton is not None and v.evidence and not any(_on_release(e, triton) for e in v.evidence)
    if v.failed:
        now = "nothing (failed on this code)"
    elif v.features is None:
        now = "nothing"
    elif v.path in COMPONENTS:
        now = "the protocol"
    else:
        now = ", ".join(sorted(v.features)) or "the base pattern"
        for w in sorted({w for e in v.evidence for w in e.get("world_sizes", ())}):
            at = frozenset().union(*(_features_at(e, w) for e in v.evidence if w in e.get("world_sizes", ())))
            if at != v.features:
                now += f"; at W={w} only {', '.join(sorted(at)) or 'the base pattern'}"
        refused = sorted({name for e in v.evidence for name in e.get("refused", {})})
        now += f" (except {', '.join(refused)})" if refused else ""
    if other and not v.failed:
        now = f"nothing with this Triton {triton} (verified with another release: {now})"
    return {"path": v.path, "verified": now, "evidence": [_evidence_text(e) for e in v.evidence + v.failed],
            "stale": [_evidence_text(e) for e in v.stale], "files": list(v.files)}


def table(record: Optional[dict] = None) -> str:
    """The verification table (markdown): per path and component, what is verified on the code here now, on what
    evidence, and what evidence went stale."""
    rows = ["| path | verified now | evidence on this code | stale evidence (code changed since) |",
            "|---|---|---|---|"]
    for v in verdicts(record):
        s = summary(v)
        rows.append(f"| `{s['path']}` | {s['verified']} | {'; '.join(s['evidence']) or '-'} | "
                    f"{'; '.join(s['stale']) or '-'} |")
    return "\n".join(rows)
