"""The FlashInfer capability probe against fake packages built from every recorded release, broken packages and
signature-less callables. Each fake is loaded with ``fake_flashinfer.loaded`` so nothing leaks out of a test."""
import dataclasses
import inspect
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from arfuse.probe import flashinfer_api as fa
from tests.unit import fake_flashinfer as ff

T, F = True, False
# version -> (api, (group, comm_backend, trigger_completion_at_end, block_quant_group_size, weight_bias),
#             path for WORLD, path for a subgroup): the timeline of issue 3, for the API arfuse prefers
EXPECTED = {
    "0.2.8": ("legacy", (T, F, T, F, F), "legacy", "legacy"),
    "0.2.9": ("legacy", (T, F, T, F, F), "legacy", "legacy"),
    "0.2.11": ("legacy", (T, F, T, F, F), "legacy", "legacy"),
    "0.5.0": ("legacy", (T, F, T, F, F), "legacy", "legacy"),
    "0.6.0": ("both", (F, T, F, F, F), "legacy", "legacy"),
    "0.6.7": ("both", (F, T, F, F, F), "legacy", "legacy"),
    "0.6.8": ("both", (F, T, T, F, F), "unified", "legacy"),
    "0.6.10": ("both", (F, T, T, F, F), "unified", "legacy"),
    "0.6.10.post1": ("both", (T, T, T, F, F), "unified", "unified"),
    "0.6.12": ("both", (T, T, T, T, T), "unified", "unified"),
    "0.7.1": ("both", (T, T, T, T, T), "unified", "unified"),
    "0.7.2.post1": ("both", (T, T, T, T, T), "unified", "unified"),
    "0.7.4": ("both", (T, T, T, T, T), "unified", "unified"),
}
FLAGS = ("group", "comm_backend", "trigger_completion_at_end", "block_quant_group_size", "weight_bias")


def test_expectations_cover_every_recorded_release():
    assert sorted(EXPECTED) == sorted(ff.versions())


@pytest.mark.parametrize("version", list(EXPECTED))
def test_classifies_recorded_release(tmp_path, version):
    api, flags, world_path, sub_path = EXPECTED[version]
    with ff.loaded(ff.write(tmp_path, version)) as p:
        assert p.available and p.reason == ""
        assert (p.version, p.api) == (version, api)
        assert tuple(p.supports[f] for f in FLAGS) == flags
        assert (p.path_for(False), p.path_for(True)) == (world_path, sub_path)
        for name in ff.function_names(version):
            assert p.params[name] == tuple(ff.recorded_signature(version, name).parameters)
            assert p.functions[name].source == "signature"
        recorded = ff.signatures()[version]["AllReduceFusionPattern"].split(";", 1)[1]
        assert dict(p.patterns) == {k.strip(): int(v) for k, v in (m.split("=") for m in recorded.split(","))}
        assert p.supports["fp8_scale_tensor"] == (version != "0.2.8")  # 0.2.8 takes a host float
        assert p.supports["use_oneshot_none"] == (version != "0.2.8")  # 0.2.8 needs a bool


def test_conservative_sets_are_what_every_release_accepts():
    for name, conservative in fa.CONSERVATIVE.items():
        per_version = [set(ff.recorded_signature(v, name).parameters) for v in ff.versions()
                       if name in ff.signatures()[v]]
        if not per_version:  # the destroy function is not in the signatures file
            continue
        assert set(conservative) == set.intersection(*per_version), name


@pytest.mark.parametrize("kind, words", [("import", ("RuntimeError", "CUDA driver too old")),
                                         ("extension", ("OSError", "undefined symbol")),
                                         ("attribute", ("RuntimeError", "not available on this build"))])
def test_broken_packages_become_reasons(tmp_path, kind, words):
    with ff.loaded(ff.write_broken(tmp_path, kind)) as p:
        assert not p.available and p.api is None
        assert all(w in p.reason for w in words), p.reason
        assert p.path_for(False) is None and p.as_dict()["supports"]["group"] is False


def test_missing_package_is_a_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with ff.loaded(empty) as p:
        assert not p.available
        assert "flashinfer" in p.reason


@pytest.mark.parametrize("mode, source", [("wrapped", "__wrapped__"), ("text", "__text_signature__"),
                                          ("bare", "conservative"), ("typeerror", "conservative")])
def test_signature_less_callables(tmp_path, mode, source):
    version = "0.7.2.post1"
    with ff.loaded(ff.write(tmp_path, version, signature_less=mode)) as p:
        for name in ("allreduce_fusion", "trtllm_allreduce_fusion"):
            info = p.functions[name]
            assert info.source == source
            expected = (tuple(ff.recorded_signature(version, name).parameters) if source != "conservative"
                        else fa.CONSERVATIVE[name])
            assert info.params == expected
        assert p.available
        if source == "conservative":
            # nothing says the unified call takes trigger_completion_at_end: drive the legacy one
            assert (p.path_for(False), p.path_for(True)) == ("legacy", "legacy")
            assert any("trigger_completion_at_end" in n for n in p.notes)
            assert not p.flags("legacy")["fp8_scale_tensor"]  # unknown annotation: no FP8 through it


def test_legacy_only_and_newer_release(tmp_path):
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1", only=("legacy",))) as p:
        assert (p.available, p.api, p.path_for(True)) == (True, "legacy", "legacy")
        assert "allreduce_fusion" not in p.functions
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1", extra_params=True, version_string="9.9.9")) as p:
        assert (p.available, p.version, p.api, p.path_for(True)) == (True, "9.9.9", "both", "unified")
        assert p.params["allreduce_fusion"][-2:] == ("future_option", "future_tensor")


def test_probe_is_cached_immutable_hashable_picklable(tmp_path):
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p:
        assert fa.probe() is p
        assert fa.probe(refresh=True) is not p and fa.probe(refresh=True) == p
        fa.probe.cache_clear()
        assert fa.probe() == p
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.available = False
        with pytest.raises(TypeError):
            p.supports["group"] = False
        assert hash(p) == hash(pickle.loads(pickle.dumps(p)))
        assert isinstance(p.as_dict()["functions"]["allreduce_fusion"]["params"], list)


def test_parse_text_signature():
    sig = fa.parse_text_signature("($module, a, b=1, /, c=2, d=(1, 2), *, e, **kw)")
    kinds = {n: p.kind for n, p in sig.parameters.items()}
    assert list(kinds) == ["a", "b", "c", "d", "e", "kw"]
    assert kinds["a"] is inspect.Parameter.POSITIONAL_ONLY and kinds["c"] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert kinds["e"] is inspect.Parameter.KEYWORD_ONLY and kinds["kw"] is inspect.Parameter.VAR_KEYWORD
    assert sig.parameters["d"].default is not inspect.Parameter.empty
    with pytest.raises(ValueError):
        fa.parse_text_signature("no parens")


def test_bare_varargs_wrapper_is_not_a_signature():
    def wrapper(*args, **kwargs):
        return None

    info = fa.describe(fa.LEGACY_FUSION, wrapper)
    assert info.source == "conservative" and info.params == fa.CONSERVATIVE[fa.LEGACY_FUSION]


REAL_SITE = os.environ.get("ARFUSE_FI_REAL_SITE")
_REAL_SCRIPT = """
import inspect, json, torch
import flashinfer.comm as comm
from arfuse.backends import flashinfer_adapter as ad
from arfuse.probe.flashinfer_api import FUNCTIONS, probe
from arfuse.backends import flashinfer_patterns as fp
from arfuse.core.spec import catalogue
p = probe()
bound = {}
for path in [q for q in ("unified", "legacy") if all(n in p.functions for n in FUNCTIONS[q])]:
    create, fusion = FUNCTIONS[path]
    values = ad.create_values(path, rank=0, world=2, max_tokens=8, hidden=64, dtype=torch.bfloat16, group=None,
                              flags=p.flags(path))
    args, kwargs = ad.build_call(p.functions[create], values)
    created = inspect.signature(getattr(comm, create)).bind(*args, **kwargs).arguments
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    handle = ad.Handle(path, 0, 2, 8, 64, torch.bfloat16, None, p.functions[fusion], getattr(comm, fusion),
                       p.flags(path), workspace=object(), workspace_tensor=torch.zeros(7), metadata={})
    fn, args, kwargs = ad.fusion_call(handle, pattern_code=1, oneshot=None, x=x, allreduce_out=x, residual_in=x,
                                      residual_out=x, norm_out=x, quant_out=None, gamma=x[0], eps=1e-6, scale=None)
    fused = inspect.signature(fn).bind(*args, **kwargs).arguments
    scalars = lambda b: {k: v for k, v in b.items() if isinstance(v, (bool, int, float, str, type(None)))}
    fn, args, kwargs = ad.fusion_call(handle, pattern_code=8, oneshot=None, x=x, allreduce_out=x, residual_in=x,
                                      residual_out=x, norm_out=None, quant_out=x, gamma=x[0], eps=1e-6, scale=None,
                                      scale_out=x, group_size=128, weight_bias=1.0)
    group = scalars(inspect.signature(fn).bind(*args, **kwargs).arguments)
    handle.moe = p.functions.get(fp.LEGACY_MOE)
    handle.moe_fn = getattr(comm, fp.LEGACY_MOE, None)
    fn, args, kwargs = ad.moe_finalize_call(handle, pattern_code=7, expert_out=x, permuted_idx=x, expert_scales=x,
                                            shared=None, residual_in=x, residual_out=x, norm_out=x, gamma=x[0],
                                            eps=1e-6, weight_bias=1.0)
    moe = inspect.signature(fn).bind(*args, **kwargs).arguments
    bound[path] = {"create": {k: str(v) for k, v in created.items()},
                   "trigger": fused.get("trigger_completion_at_end"), "group": group,
                   "moe": dict(scalars(moe), tensors=sorted(k for k, v in moe.items() if v is x)),
                   "routes": {s.name: fp.route(s, p, path)[1] or "ok" for s in catalogue()}}
print(json.dumps({"probe": p.as_dict(), "bound": bound}))
"""


@pytest.mark.skipif(not REAL_SITE, reason="set ARFUSE_FI_REAL_SITE to a directory holding flashinfer-python "
                    "installed with --no-deps (+ apache-tvm-ffi, cuda-python, requests, nvidia-ml-py)")
def test_real_flashinfer_package():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REAL_SITE, str(ff._HERE.parents[1])]))
    proc = subprocess.run([sys.executable, "-c", _REAL_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    p = report["probe"]
    assert p["available"], p["reason"]
    if p["version"] in EXPECTED:
        api, flags, world_path, sub_path = EXPECTED[p["version"]]
        assert (p["api"], p["paths"]["world"], p["paths"]["subgroup"]) == (api, world_path, sub_path)
        assert tuple(p["supports"][f] for f in FLAGS) == flags
        for name, info in p["functions"].items():
            if name in ff.signatures()[p["version"]]:
                assert tuple(info["params"]) == tuple(ff.recorded_signature(p["version"], name).parameters)
    for path, b in report["bound"].items():
        assert b["trigger"] is True
        if path == "unified":
            assert b["create"]["backend"] == "trtllm"
        if "block_quant_group_size" in p["functions"][fa.FUNCTIONS[path][1]]["params"]:
            assert b["group"]["block_quant_group_size"] == 128 and b["group"]["weight_bias"] == 1.0
        moe = b["moe"]
        assert {"expanded_idx_to_permuted_idx", "expert_scale_factor", "residual_in", "norm_out"} <= set(moe["tensors"])
        assert moe.get("moe_finalize_backend", moe.get("backend", "trtllm")) == "trtllm"
    if p["version"] in ff.versions():  # the fake of this release maps every spec exactly as the real package
        from arfuse.backends import flashinfer_patterns as fp
        from arfuse.core.spec import catalogue

        with ff.loaded(ff.write(Path(tempfile.mkdtemp()), p["version"])) as fake:
            for path, b in report["bound"].items():
                assert b["routes"] == {s.name: fp.route(s, fake, path)[1] or "ok" for s in catalogue()}, path
