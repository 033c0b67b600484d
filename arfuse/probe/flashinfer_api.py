"""Which FlashInfer is installed and what its allreduce-fusion API accepts. Never raises; needs no GPU.

``probe() -> FlashInferProbe`` imports whatever ``import flashinfer`` finds (a fake package earlier on
``sys.path`` included), reads its version, the ``AllReduceFusionPattern`` codes and, per fusion function, the
parameters it accepts. Any failure - an import that raises, an attribute access that raises, a broken extension,
a callable without signature metadata - becomes a reason string or a conservative answer, never an exception.
The result is cached and immutable; ``probe(refresh=True)`` or ``probe.cache_clear()`` probes again.

Two API generations exist (see ``shared/data/flashinfer_api_signatures.json``): the legacy
``trtllm_create_ipc_workspace_for_all_reduce_fusion`` / ``trtllm_allreduce_fusion`` (0.2.8+) and the unified
``create_allreduce_fusion_workspace`` / ``allreduce_fusion`` (0.6.0+). :meth:`FlashInferProbe.path_for` says which
one arfuse drives for a group.
"""
from __future__ import annotations

import enum
import importlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

UNIFIED, LEGACY = "unified", "legacy"
UNIFIED_CREATE = "create_allreduce_fusion_workspace"
UNIFIED_FUSION = "allreduce_fusion"
LEGACY_CREATE = "trtllm_create_ipc_workspace_for_all_reduce_fusion"
LEGACY_FUSION = "trtllm_allreduce_fusion"
LEGACY_DESTROY = "trtllm_destroy_ipc_workspace_for_all_reduce_fusion"
LEGACY_MOE = "trtllm_moe_finalize_allreduce_fusion"  # MoE finalize on legacy workspaces (no pattern code)
PATTERN_CLASS = "AllReduceFusionPattern"
FUNCTIONS = {UNIFIED: (UNIFIED_CREATE, UNIFIED_FUSION), LEGACY: (LEGACY_CREATE, LEGACY_FUSION)}
_SUBMODULES = ("flashinfer.comm.allreduce", "flashinfer.comm.trtllm_ar")

# The parameters every recorded generation (0.2.8 .. 0.7.4) accepts, by name. A callable whose signature
# cannot be read is driven with these only, and by keyword only (positions moved between 0.2.8 and 0.2.9).
CONSERVATIVE: Dict[str, Tuple[str, ...]] = {
    LEGACY_CREATE: ("tp_rank", "tp_size", "max_token_num", "hidden_dim", "use_fp32_lamport", "group"),
    LEGACY_FUSION: ("allreduce_in", "world_size", "world_rank", "token_num", "hidden_dim", "workspace_ptrs",
                    "launch_with_pdl", "use_oneshot", "trigger_completion_at_end", "fp32_acc", "pattern_code",
                    "allreduce_out", "residual_in", "residual_out", "norm_out", "quant_out", "scale_out",
                    "rms_gamma", "rms_eps", "scale_factor", "layout_code"),
    UNIFIED_CREATE: ("backend", "world_size", "rank", "max_token_num", "hidden_dim", "dtype", "gpus_per_node",
                     "comm_backend", "force_oneshot_support"),
    UNIFIED_FUSION: ("input", "workspace", "pattern", "launch_with_pdl", "output", "residual_out", "norm_out",
                     "quant_out", "scale_out", "residual_in", "rms_gamma", "rms_eps", "scale_factor",
                     "layout_code", "use_oneshot", "fp32_acc"),
    LEGACY_DESTROY: ("workspace", "group"),
    LEGACY_MOE: ("allreduce_in", "residual_in", "norm_weight", "expanded_idx_to_permuted_idx", "norm_out",
                 "residual_out", "workspace_ptrs", "launch_with_pdl", "world_rank", "world_size", "eps",
                 "shared_expert_output", "expert_scale_factor"),
}
# The per-kwarg flags doctor reports (for the API arfuse prefers), plus what the backend needs to know.
SUPPORT_FLAGS = ("group", "comm_backend", "trigger_completion_at_end", "block_quant_group_size", "weight_bias",
                 "create_metadata", "use_oneshot_none", "fp32", "fp8_scale_tensor")


class FrozenMap(Mapping):
    """A read-only, hashable, picklable mapping (probe results live inside frozen, hashable GroupCaps)."""

    __slots__ = ("_items",)

    def __init__(self, items: Optional[Mapping] = None):
        object.__setattr__(self, "_items", dict(items or {}))

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items(), key=lambda kv: str(kv[0]))))

    def __setattr__(self, name, value):
        raise AttributeError("FrozenMap is read-only")

    def __reduce__(self):
        return (FrozenMap, (self._items,))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


@dataclass(frozen=True)
class FunctionInfo:
    """What one FlashInfer function accepts. ``layout`` is ``(name, kind, has_default)`` in declared order
    (kind: an ``inspect.Parameter`` kind name); ``source`` says where it came from: ``signature``,
    ``__wrapped__``, ``__text_signature__`` or ``conservative`` (nothing readable: names only, by keyword)."""

    name: str
    layout: Tuple[Tuple[str, str, bool], ...]
    source: str
    annotations: Tuple[Tuple[str, str], ...] = ()
    var_keyword: bool = False

    @property
    def params(self) -> Tuple[str, ...]:
        return tuple(n for n, kind, _ in self.layout if kind not in ("VAR_POSITIONAL", "VAR_KEYWORD"))

    @property
    def conservative(self) -> bool:
        return self.source == "conservative"

    def accepts(self, name: str) -> bool:
        return name in self.params or self.var_keyword

    def annotation(self, name: str) -> str:
        return dict(self.annotations).get(name, "")


@dataclass(frozen=True)
class FlashInferProbe:
    """What the installed FlashInfer offers. ``available``: importable with a usable fusion API (not: a GPU can
    run it). ``api``: ``"unified"``, ``"legacy"``, ``"both"`` or None. ``supports``: per-kwarg flags of the API
    arfuse prefers (unified when present). ``functions``: name -> :class:`FunctionInfo`. ``patterns``:
    ``AllReduceFusionPattern`` member -> int. ``paths``: which API arfuse drives for ``"world"`` and
    ``"subgroup"`` groups (None: neither qualifies; ``notes`` say why)."""

    available: bool
    reason: str
    version: Optional[str] = None
    api: Optional[str] = None
    module_file: Optional[str] = None
    functions: FrozenMap = field(default_factory=FrozenMap)
    patterns: FrozenMap = field(default_factory=FrozenMap)
    supports: FrozenMap = field(default_factory=lambda: FrozenMap({f: False for f in SUPPORT_FLAGS}))
    path_flags: FrozenMap = field(default_factory=FrozenMap)  # path -> FrozenMap of SUPPORT_FLAGS
    paths: FrozenMap = field(default_factory=FrozenMap)
    notes: Tuple[str, ...] = ()

    @property
    def params(self) -> Mapping[str, Tuple[str, ...]]:
        """Function name -> accepted parameter names."""
        return FrozenMap({name: info.params for name, info in self.functions.items()})

    def path_for(self, subgroup: bool) -> Optional[str]:
        """``"unified"`` or ``"legacy"``: the API arfuse drives for a group that is (or is not) a strict subset of
        WORLD, or None."""
        return self.paths.get("subgroup" if subgroup else "world")

    def flags(self, path: str) -> Mapping[str, bool]:
        return self.path_flags.get(path, FrozenMap({f: False for f in SUPPORT_FLAGS}))

    def as_dict(self) -> Dict[str, Any]:
        """Plain JSON-able form (``arfuse doctor --json``)."""
        return {
            "available": self.available, "reason": self.reason, "version": self.version, "api": self.api,
            "module_file": self.module_file, "supports": dict(self.supports),
            "paths": dict(self.paths), "notes": list(self.notes),
            "functions": {n: {"params": list(i.params), "source": i.source} for n, i in self.functions.items()},
            "patterns": dict(self.patterns),
        }


# -- reading callables ----------------------------------------------------------------------------------------
def _informative(sig: inspect.Signature) -> bool:
    """A bare ``(*args, **kwargs)`` wrapper says nothing about what the function accepts."""
    kinds = {p.kind for p in sig.parameters.values()}
    return not kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def parse_text_signature(text: str) -> inspect.Signature:
    """An ``inspect.Signature`` from a C extension's ``__text_signature__`` such as ``"($module, a, b=1, /, *, c)"``."""
    if not isinstance(text, str) or not (text.startswith("(") and ")" in text):
        raise ValueError(f"not a text signature: {text!r}")
    body = text[1:text.rindex(")")]
    tokens, depth, cur = [], 0, ""
    for ch in body:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            tokens.append(cur.strip())
            cur = ""
        else:
            cur += ch
    tokens.append(cur.strip())
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for tok in filter(None, tokens):
        if tok.startswith("$"):
            continue
        if tok == "/":
            params = [p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in params]
            continue
        if tok == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        name = tok.split("=", 1)[0].split(":", 1)[0].strip()
        if name.startswith("**"):
            params.append(inspect.Parameter(name[2:], inspect.Parameter.VAR_KEYWORD))
        elif name.startswith("*"):
            params.append(inspect.Parameter(name[1:], inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
        else:
            default = None if "=" in tok else inspect.Parameter.empty
            params.append(inspect.Parameter(name, kind, default=default))
    return inspect.Signature(params)


def _signature(fn) -> Tuple[Optional[inspect.Signature], str]:
    """The first readable, informative signature of ``fn``: its own, its ``__wrapped__``'s, its text signature."""
    getters = (("signature", lambda: inspect.signature(fn)),
               ("__wrapped__", lambda: inspect.signature(fn.__wrapped__)),
               ("__text_signature__", lambda: parse_text_signature(fn.__text_signature__)))
    for source, get in getters:
        try:
            sig = get()
        except Exception:  # boundary: foreign callables may raise anything from attribute access
            continue
        if _informative(sig):
            return sig, source
    return None, "conservative"


def describe(name: str, fn) -> FunctionInfo:
    """:class:`FunctionInfo` for ``fn``, falling back to :data:`CONSERVATIVE` when no signature is readable."""
    sig, source = _signature(fn)
    if sig is None:
        names = CONSERVATIVE.get(name, ())
        return FunctionInfo(name, tuple((n, "KEYWORD_ONLY", True) for n in names), "conservative")
    layout, annotations, var_kw = [], [], False
    for p in sig.parameters.values():
        layout.append((p.name, p.kind.name, p.default is not inspect.Parameter.empty))
        var_kw = var_kw or p.kind is inspect.Parameter.VAR_KEYWORD
        if p.annotation is not inspect.Parameter.empty:
            annotations.append((p.name, inspect.formatannotation(p.annotation)))
    return FunctionInfo(name, tuple(layout), source, tuple(annotations), var_kw)


# -- reading the package --------------------------------------------------------------------------------------
def _import(name: str):
    try:
        return importlib.import_module(name), None
    except (Exception, SystemExit) as e:  # boundary: a broken package may raise anything on import
        return None, f"import {name} failed: {type(e).__name__}: {e}"


def _get(obj, name: str):
    """``getattr`` that turns any exception into (None, reason); a missing attribute is (None, None)."""
    try:
        return getattr(obj, name), None
    except AttributeError:
        return None, None
    except Exception as e:  # boundary: modules may define a raising __getattr__
        return None, f"reading {name} raised {type(e).__name__}: {e}"


def _lookup(comm, name: str):
    found, err = _get(comm, name)
    if found is not None or err is not None:
        return found, err
    for sub in _SUBMODULES:
        module, _ = _import(sub)
        if module is not None:
            found, err = _get(module, name)
            if found is not None or err is not None:
                return found, err
    return None, None


DISTRIBUTIONS = ("flashinfer-python", "flashinfer")  # the package's names on PyPI, newest first


def installed_version() -> Optional[str]:
    """The version the installed distribution's metadata records, or None if none is installed. Imports nothing,
    so it answers even when ``import flashinfer`` fails (e.g. a missing native dependency)."""
    from importlib import metadata

    for name in DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except Exception:  # boundary: absent (PackageNotFoundError) or broken distribution metadata
            continue
    return None


def _version(fi) -> Optional[str]:
    version, _ = _get(fi, "__version__")
    return version if isinstance(version, str) else installed_version()


def _patterns(comm) -> Tuple[Dict[str, int], Optional[str]]:
    cls, err = _lookup(comm, PATTERN_CLASS)
    if cls is None:
        return {}, err or f"{PATTERN_CLASS} not found"
    try:
        members = dict(vars(cls))
    except TypeError as e:
        return {}, f"{PATTERN_CLASS}: {e}"
    out = {}
    for key, value in members.items():
        if isinstance(value, enum.Enum):
            value = value.value
        if key.startswith("k") and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
    return out, None


def _flags(path: str, functions: Mapping[str, FunctionInfo]) -> FrozenMap:
    create, fusion = (functions[n] for n in FUNCTIONS[path])
    use_oneshot = fusion.annotation("use_oneshot")
    return FrozenMap({
        "group": create.accepts("group"),
        "comm_backend": create.accepts("comm_backend"),
        "trigger_completion_at_end": fusion.accepts("trigger_completion_at_end"),
        "block_quant_group_size": fusion.accepts("block_quant_group_size"),
        "weight_bias": fusion.accepts("weight_bias"),
        "create_metadata": path == LEGACY and create.accepts("create_metadata") and fusion.accepts("metadata"),
        "use_oneshot_none": "Optional" in use_oneshot or "None" in use_oneshot,
        "fp32": create.accepts("dtype" if path == UNIFIED else "use_fp32_lamport"),
        "fp8_scale_tensor": "Tensor" in fusion.annotation("scale_factor"),
    })


def _choose_paths(flags: Mapping[str, Mapping[str, bool]]) -> Tuple[Dict[str, Optional[str]], list]:
    """Unified when it can be told everything safety needs, else legacy (see :meth:`FlashInferProbe.path_for`)."""
    notes, paths = [], {}
    for scope, subgroup in (("world", False), ("subgroup", True)):
        paths[scope] = None
        for path in (UNIFIED, LEGACY):
            f = flags.get(path)
            if f is None:
                continue
            if not f["trigger_completion_at_end"]:
                # without it FlashInfer may signal PDL completion before the one-shot Lamport writes land
                notes.append(f"{path} ({scope}): cannot pass trigger_completion_at_end")
                continue
            if subgroup and not f["group"]:
                # without it FlashInfer rendezvouses on WORLD and a subgroup's peers wait forever
                notes.append(f"{path} ({scope}): cannot pass group")
                continue
            paths[scope] = path
            break
    return paths, list(dict.fromkeys(notes))


def _first(notes: list) -> str:
    if not notes:
        return ""
    more = f"; {len(notes) - 1} more in notes" if len(notes) > 1 else ""
    return f" ({notes[0]}{more})"


def _probe_now() -> FlashInferProbe:
    fi, err = _import("flashinfer")
    if fi is None:
        return FlashInferProbe(False, err, version=installed_version())
    version = _version(fi)
    module_file, _ = _get(fi, "__file__")
    module_file = module_file if isinstance(module_file, str) else None
    comm, err = _import("flashinfer.comm")
    if comm is None:
        return FlashInferProbe(False, err, version=version, module_file=module_file)
    functions, notes = {}, []
    for name in (UNIFIED_CREATE, UNIFIED_FUSION, LEGACY_CREATE, LEGACY_FUSION, LEGACY_DESTROY, LEGACY_MOE):
        fn, err = _lookup(comm, name)
        if err:
            notes.append(err)
        if fn is not None and callable(fn):
            functions[name] = describe(name, fn)
    patterns, err = _patterns(comm)
    if err:
        notes.append(err)
    present = [p for p in (UNIFIED, LEGACY) if all(n in functions for n in FUNCTIONS[p])]
    api = {2: "both", 1: present[0] if present else None, 0: None}[len(present)]
    flags = {p: _flags(p, functions) for p in present}
    paths, path_notes = _choose_paths(flags)
    supports = flags[present[0]] if present else FrozenMap({f: False for f in SUPPORT_FLAGS})
    reason = ""
    if not present:
        reason = "no allreduce-fusion API found in flashinfer.comm" + _first(notes)
    elif paths["world"] is None:
        reason = "no usable allreduce-fusion API: " + "; ".join(path_notes)
    elif not patterns:
        reason = f"{PATTERN_CLASS} unreadable" + _first(notes)
    return FlashInferProbe(
        available=not reason, reason=reason, version=version, api=api, module_file=module_file,
        functions=FrozenMap(functions), patterns=FrozenMap(patterns), supports=FrozenMap(supports),
        path_flags=FrozenMap(flags), paths=FrozenMap(paths), notes=tuple(notes + path_notes))


_cached: Optional[FlashInferProbe] = None
_lock = threading.Lock()


def probe(refresh: bool = False) -> FlashInferProbe:
    """The (cached) :class:`FlashInferProbe` of the FlashInfer ``import flashinfer`` finds. Never raises.

    Not collective; imports flashinfer on first call. ``refresh=True`` probes again.
    """
    global _cached
    with _lock:
        if _cached is None or refresh:
            try:
                _cached = _probe_now()
            except Exception as e:  # boundary: the probe must never break its caller
                _cached = FlashInferProbe(False, f"probe failed: {type(e).__name__}: {e}")
        return _cached


def cache_clear() -> None:
    """Forget the cached probe (tests swap packages on ``sys.path``)."""
    global _cached
    with _lock:
        _cached = None


probe.cache_clear = cache_clear  # type: ignore[attr-defined]
