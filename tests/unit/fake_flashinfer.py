"""Writes fake ``flashinfer`` packages for CPU tests, one per entry of the recorded signatures file
(``flashinfer_api_signatures.json``): every function has exactly the recorded parameters (and return
annotation), records each call's ``(name, args, kwargs)`` in ``flashinfer.comm.CALLS`` and returns what that
release returns. Extra kinds: signature-less callables, a package whose import raises, one whose attribute
access raises, a legacy-only one and a newer-than-known one with extra parameters.

``write(root, version, ...)`` returns the directory to put first on ``sys.path`` (or ``PYTHONPATH``).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterable, Optional

_HERE = Path(__file__).resolve().parent
_CANDIDATES = (os.environ.get("ARFUSE_FI_SIGNATURES", ""), _HERE / "data" / "flashinfer_api_signatures.json",
               _HERE.parents[2] / "shared" / "data" / "flashinfer_api_signatures.json")

UNIFIED = ("create_allreduce_fusion_workspace", "allreduce_fusion")
LEGACY = ("trtllm_create_ipc_workspace_for_all_reduce_fusion", "trtllm_allreduce_fusion",
          "trtllm_moe_finalize_allreduce_fusion")
NEWER_VERSION = "9.9.9"
NEWER_EXTRA = ", future_option: bool = False, future_tensor: Optional[torch.Tensor] = None"


def signatures() -> Dict[str, dict]:
    """version -> {function name: recorded signature string, "AllReduceFusionPattern": ..., ...}."""
    for path in _CANDIDATES:
        if path and Path(path).is_file():
            return json.loads(Path(path).read_text())["versions"]
    raise FileNotFoundError(f"flashinfer_api_signatures.json not found in {[str(p) for p in _CANDIDATES]}")


def versions() -> list:
    return list(signatures())


def function_names(version: str) -> list:
    entry = signatures()[version]
    return [k for k in entry if k not in ("AllReduceFusionPattern", "exported")]


def recorded_signature(version: str, name: str) -> inspect.Signature:
    """The recorded signature as an ``inspect.Signature`` (annotations stay strings)."""
    ns: dict = {}
    exec(compile(f"from __future__ import annotations\ndef f{signatures()[version][name]}: pass",
                 f"<{version}:{name}>", "exec"), ns)
    return inspect.signature(ns["f"])


def _with_extra(sig: str) -> str:
    head, arrow, ret = sig.rpartition(") -> ")
    return f"{head}{NEWER_EXTRA}{arrow}{ret}"


def _patterns(text: str) -> str:
    members = [m.strip() for m in text.split(";", 1)[1].split(",") if "=" in m]
    return "class AllReduceFusionPattern:\n" + "".join(f"    {m.split('=')[0].strip()} = {m.split('=')[1]}\n"
                                                        for m in members)


_BODIES = {
    "trtllm_create_ipc_workspace_for_all_reduce_fusion": """
        a = dict(locals())
        _maybe_fail(a["tp_rank"])
        return _legacy_workspace(a, {ret!r})""",
    "create_allreduce_fusion_workspace": """
        a = dict(locals())
        _maybe_fail(a["rank"])
        return FakeWorkspace(a)""",
    "trtllm_allreduce_fusion": """
        return None""",
    "trtllm_moe_finalize_allreduce_fusion": """
        return None""",
    "allreduce_fusion": """
        a = dict(locals())
        return a.get("norm_out") if a.get("norm_out") is not None else a.get("output")""",
}

_RUNTIME = '''
import functools
import torch

CALLS = []
FAIL_CREATE_ON_RANK = {fail!r}


def _maybe_fail(rank):
    if FAIL_CREATE_ON_RANK is not None and rank == FAIL_CREATE_ON_RANK:
        raise RuntimeError(f"fake flashinfer: workspace creation failed on rank {{rank}}")


def _legacy_workspace(a, ret):
    size = a["tp_size"]
    ptrs = [0x1000 * (i + 1) for i in range(3 * size + 1)]
    if ret.startswith("List[int]"):  # 0.2.8/0.2.9 annotate a flat pointer list
        return ptrs
    ipc = [ptrs[i * size:(i + 1) * size] for i in range(3)]
    tensor = torch.tensor(ptrs, dtype=torch.int64)
    if not a.get("create_metadata"):
        return ipc, tensor
    meta = {{"tp_rank": a["tp_rank"], "tp_size": size, "max_token_num": a["max_token_num"],
             "hidden_dim": a["hidden_dim"], "use_fp32_lamport": a["use_fp32_lamport"]}}
    return (ipc, tensor, [], meta) if a.get("use_symm_dev_mem") else (ipc, tensor, meta)


class FakeWorkspace:
    def __init__(self, a):
        self.created_with = a
        self.backend = a["backend"] if a["backend"] != "auto" else "mnnvl"
        self.world_size, self.rank = a["world_size"], a["rank"]

    def destroy(self):
        CALLS.append(("workspace.destroy", (self,), {{}}))


def trtllm_destroy_ipc_workspace_for_all_reduce_fusion(workspace, group=None):
    CALLS.append(("trtllm_destroy_ipc_workspace_for_all_reduce_fusion", (workspace,), {{"group": group}}))


def _record(name):
    def wrap(impl):
        @functools.wraps(impl)
        def wrapper(*args, **kwargs):
            CALLS.append((name, args, kwargs))
            return impl(*args, **kwargs)
        return wrapper
    return wrap


class NoSignature:
    """A callable whose signature inspect cannot read (as a C-extension function without metadata)."""

    def __init__(self, name, impl, mode):
        self._name, self._impl, self._mode = name, impl, mode
        if mode == "wrapped":
            self.__wrapped__ = impl
        if mode == "text":
            self.__text_signature__ = _text_signature(impl)

    @property
    def __signature__(self):
        if self._mode == "typeerror":
            return "not a Signature"  # inspect raises TypeError
        raise ValueError(f"no signature found for builtin {{self._name}}")

    def __call__(self, *args, **kwargs):
        CALLS.append((self._name, args, kwargs))
        return self._impl(*args, **kwargs)


def _text_signature(impl):
    import inspect
    parts, star = [], False
    for p in inspect.signature(impl).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name + ("=None" if p.default is not p.empty else ""))
    return "(" + ", ".join(parts) + ")"
'''


def write(root, version: str, *, fail_create_on_rank: Optional[int] = None, signature_less: Optional[str] = None,
          only: Optional[Iterable[str]] = None, extra_params: bool = False, version_string: Optional[str] = None,
          extra_required: Optional[str] = None) -> Path:
    """A fake package for ``version``'s recorded API under a fresh directory in ``root``; returns that directory.

    ``signature_less``: ``"wrapped"``, ``"text"``, ``"bare"`` or ``"typeerror"`` makes every fusion function a
    callable inspect cannot read (with ``__wrapped__``, with ``__text_signature__``, or neither).
    ``only``: the API generations to keep (``("legacy",)`` drops the unified API). ``extra_params`` appends new
    optional parameters (a newer release); ``extra_required`` names a new required parameter of the fusion calls.
    """
    entry = signatures()[version]
    keep = set(only or ("unified", "legacy"))
    names = [n for n in function_names(version) if (n in UNIFIED and "unified" in keep)
             or (n in LEGACY and "legacy" in keep)]
    out = Path(root) / f"fi_{(version_string or version).replace('.', '_')}_{os.urandom(4).hex()}"
    pkg = out / "flashinfer" / "comm"
    pkg.mkdir(parents=True)
    (out / "flashinfer" / "__init__.py").write_text(
        f"__version__ = {version_string or version!r}\nfrom . import comm  # noqa: F401\n"
        f"print('fake flashinfer {version_string or version} loaded')  # some packages print on import\n")
    src = ["from __future__ import annotations", _RUNTIME.format(fail=fail_create_on_rank),
           _patterns(entry["AllReduceFusionPattern"])]
    for name in names:
        sig = _with_extra(entry[name]) if extra_params else entry[name]
        if extra_required and name in (UNIFIED[1], LEGACY[1]):
            sig = f"({extra_required}, {sig[1:]}"
        body = textwrap.dedent(_BODIES[name].format(ret=entry[name].rpartition("-> ")[2])).strip("\n")
        src.append(f"def _impl_{name}{sig}:\n" + textwrap.indent(body, "    ") + "\n")
        if signature_less and name in (UNIFIED[1], LEGACY[1]):
            src.append(f"{name} = NoSignature({name!r}, _impl_{name}, {signature_less!r})\n")
        else:
            src.append(f"{name} = _record({name!r})(_impl_{name})\n")
    (pkg / "__init__.py").write_text("\n".join(src))
    return out


def write_broken(root, kind: str) -> Path:
    """A package that fails to load: ``"import"`` (RuntimeError on import), ``"extension"`` (a broken native
    library: OSError), ``"attribute"`` (every attribute access raises RuntimeError)."""
    out = Path(root) / f"fi_broken_{kind}_{os.urandom(4).hex()}"
    pkg = out / "flashinfer" / "comm"
    pkg.mkdir(parents=True)
    init, comm = "from . import comm  # noqa: F401\n", ""
    if kind == "import":
        init = 'raise RuntimeError("fake flashinfer: CUDA driver too old")\n'
    elif kind == "extension":
        comm = 'raise OSError("libtrtllm_comm.so: undefined symbol: _ZN5torch3jit")\n'
    elif kind == "attribute":
        getattr_src = ('def __getattr__(name):\n'
                       '    raise RuntimeError(f"fake flashinfer: {name} is not available on this build")\n')
        init, comm = init + getattr_src, getattr_src
    else:
        raise ValueError(f"write_broken: unknown kind {kind!r}")
    (out / "flashinfer" / "__init__.py").write_text(init)
    (pkg / "__init__.py").write_text(comm)
    return out


def write_dist_info(directory, version: str, name: str = "flashinfer-python") -> Path:
    """Installed-package metadata for ``name`` ``version`` in ``directory`` (what pip leaves next to the package),
    so ``importlib.metadata`` finds the distribution whether or not its import works; returns ``directory``."""
    info = Path(directory) / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return Path(directory)


def _purge() -> None:
    for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
        del sys.modules[name]


@contextlib.contextmanager
def loaded(directory):
    """Put a fake package first on ``sys.path`` and yield its fresh probe; afterwards restore ``sys.path``, the
    ``flashinfer`` modules that were imported before and the probe cache, so nothing leaks into other tests."""
    from arfuse.probe import flashinfer_api

    saved_path = list(sys.path)
    saved = {k: v for k, v in sys.modules.items() if k == "flashinfer" or k.startswith("flashinfer.")}
    _purge()
    sys.path.insert(0, str(directory))
    try:
        yield flashinfer_api.probe(refresh=True)
    finally:
        _purge()
        sys.path[:] = saved_path
        sys.modules.update(saved)
        flashinfer_api.cache_clear()


def calls() -> list:
    """The calls the currently imported fake recorded."""
    return sys.modules["flashinfer.comm"].CALLS
