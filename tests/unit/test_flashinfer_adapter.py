"""The FlashInfer adapter, workspace manager and backend against fake packages of every recorded release: every
call arfuse makes must bind to the recorded signature, pass ``group`` whenever accepted, set
``trigger_completion_at_end=True`` whenever accepted, create with ``backend="trtllm"``, keep 0.2.8's positional
order apart from 0.2.9's, and handle each legacy workspace shape. Plus: the check rules, and ``import arfuse`` /
``arfuse doctor --json`` in fresh interpreters with fake packages first on ``PYTHONPATH``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arfuse.backends import flashinfer_adapter as adapter
from arfuse.backends.flashinfer import FlashInferBackend, max_bytes
from arfuse.backends.flashinfer_workspace import WorkspaceManager, WorkspaceUnavailable
from arfuse.core.errors import FallbackError
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Pattern, Problem
from arfuse.probe import flashinfer_api as fa
from tests.unit import fake_flashinfer as ff

REPO = Path(__file__).resolve().parents[2]
BF16 = torch.bfloat16
H = 64
CODES = {Pattern.ALLREDUCE: 0, Pattern.RMSNORM: 1, Pattern.RESIDUAL_RMSNORM: 1, Pattern.RESIDUAL_RMSNORM_FP8: 2}


class Group:
    """A stand-in process group object (identity is all the adapter forwards)."""


GROUP = Group()


def _paths(version):
    names = set(ff.function_names(version))
    return [p for p, fns in (("unified", ff.UNIFIED), ("legacy", ff.LEGACY)) if set(fns) <= names]


def _bind(version, name, args, kwargs):
    return ff.recorded_signature(version, name).bind(*args, **kwargs).arguments


def _tensors(n):
    x = torch.randn(n, H, dtype=BF16)
    return dict(x=x, res=torch.randn(n, H, dtype=BF16), w=torch.ones(H, dtype=BF16), out=torch.empty_like(x),
                res_out=torch.empty_like(x), scale=torch.full((1,), 0.5))


# -- call building ----------------------------------------------------------------------------------------------
def test_build_call_rules():
    def f(a, b, c=1, *, d, e=2):
        pass

    info = fa.describe("f", f)
    assert adapter.build_call(info, {"a": 1, "b": 2, "d": 3, "unknown": 4}) == ((1, 2), {"d": 3})
    assert adapter.build_call(info, {"a": 1, "b": 2, "c": 5, "d": 3}) == ((1, 2), {"c": 5, "d": 3})
    with pytest.raises(TypeError, match="'d'"):
        adapter.build_call(info, {"a": 1, "b": 2})
    with pytest.raises(TypeError, match="'b'"):
        adapter.build_call(info, {"a": 1, "d": 3})

    def g(a, b=1, /, c=2, **kw):
        pass

    info = fa.describe("g", g)
    assert adapter.build_call(info, {"a": 1, "b": 2, "c": 3, "x": 4}) == ((1, 2), {"c": 3, "x": 4})
    class Opaque:  # a callable inspect cannot read
        @property
        def __signature__(self):
            raise ValueError("no signature found for builtin")

        def __call__(self, *args, **kwargs):
            return None

    conservative = fa.describe(fa.LEGACY_CREATE, Opaque())
    assert conservative.source == "conservative"
    args, kwargs = adapter.build_call(conservative, {"tp_rank": 0, "tp_size": 2, "create_metadata": True})
    assert args == () and kwargs == {"tp_rank": 0, "tp_size": 2}


def test_legacy_workspace_shapes():
    t = torch.arange(7)
    ipc = [[1, 2], [3, 4], [5, 6]]
    flat = adapter.normalize_legacy([11, 12, 13], torch.device("cpu"))
    assert flat[0] == [11, 12, 13] and flat[1].tolist() == [11, 12, 13] and flat[1].dtype == torch.int64
    assert adapter.normalize_legacy((ipc, t), None) == (ipc, t, None)
    assert adapter.normalize_legacy((ipc, t, {"m": 1}), None)[2] == {"m": 1}
    assert adapter.normalize_legacy((ipc, t, [object()], {"m": 2}), None)[2] == {"m": 2}
    with pytest.raises(TypeError, match="unknown workspace shape"):
        adapter.normalize_legacy(("a", "b"), None)


# -- every recorded release, every API path ---------------------------------------------------------------------
@pytest.mark.parametrize("version", ff.versions())
def test_every_call_binds_to_the_recorded_signature(tmp_path, version):
    with ff.loaded(ff.write(tmp_path, version)) as p:
        for path in _paths(version):
            create_name, fusion_name = fa.FUNCTIONS[path]
            handle = adapter.create(p, path, rank=0, world=2, max_tokens=8, hidden=H, dtype=BF16, group=GROUP,
                                    device=torch.device("cpu"))
            name, args, kwargs = ff.calls()[-1]
            bound = _bind(version, create_name, args, kwargs)
            params = ff.recorded_signature(version, create_name).parameters
            assert ("group" in bound) == ("group" in params) and bound.get("group", GROUP) is GROUP
            if path == "unified":
                assert bound["backend"] == "trtllm"
            else:
                assert bound.get("create_metadata", False) == ("metadata" in p.params[fusion_name])
                assert isinstance(handle.workspace_tensor, torch.Tensor)
                assert (handle.metadata is not None) == ("metadata" in p.params[fusion_name])
            _check_fusion_calls(version, p, handle, fusion_name)
            adapter.destroy(handle)
            adapter.destroy(handle)  # idempotent
            name, args, kwargs = ff.calls()[-1]
            destroys = [c for c in ff.calls() if c[0] in ("workspace.destroy", fa.LEGACY_DESTROY)]
            assert len(destroys) == 1
            if path == "legacy":
                assert name == fa.LEGACY_DESTROY and kwargs["group"] is GROUP
                flat = ff.signatures()[version][create_name].endswith("-> List[int]")
                assert all(type(h) is int for h in args[0]) == flat
            else:
                assert name == "workspace.destroy"
            ff.calls().clear()


def _check_fusion_calls(version, p, handle, fusion_name):
    params = ff.recorded_signature(version, fusion_name).parameters
    for pattern in Pattern:
        if pattern is Pattern.RESIDUAL_RMSNORM_FP8 and not handle.flags["fp8_scale_tensor"]:
            continue
        for variant, n in (("auto", 3), ("oneshot", 5), ("twoshot", 5), ("twoshot", 2)):
            t = _tensors(n)
            fn, args, kwargs = adapter.fusion_call(
                handle, pattern_code=CODES[pattern], oneshot=adapter.use_oneshot(variant, n, handle), x=t["x"],
                allreduce_out=t["out"], residual_in=t["res"], residual_out=t["res_out"], norm_out=t["out"],
                quant_out=None, gamma=t["w"], eps=1e-6, scale=t["scale"])
            fn(*args, **kwargs)
            call = ff.calls()[-1]
            assert call[0] == fusion_name
            bound = _bind(version, fusion_name, call[1], call[2])
            assert bound["launch_with_pdl"] is False
            if "trigger_completion_at_end" in params:
                assert bound["trigger_completion_at_end"] is True
            assert bound.get("pattern", bound.get("pattern_code")) == CODES[pattern]
            expected = {"oneshot": True, "twoshot": n <= 2}.get(variant, None if handle.flags["use_oneshot_none"]
                                                                  else True)
            assert bound["use_oneshot"] is expected
            assert bound["fp32_acc"] is True and bound["scale_factor"] is t["scale"]
            assert "block_quant_group_size" not in bound
            if "weight_bias" in params:
                assert bound["weight_bias"] == 0.0
            if handle.path == "legacy":
                assert (bound["world_size"], bound["world_rank"], bound["token_num"], bound["hidden_dim"]) == \
                    (2, 0, n, H)
                assert bound["workspace_ptrs"] is handle.workspace_tensor
                assert ("metadata" in bound) == (handle.metadata is not None)
            else:
                assert bound["workspace"] is handle.workspace


def test_positional_order_of_0_2_8_and_0_2_9(tmp_path):
    seen = {}
    for version in ("0.2.8", "0.2.9"):
        with ff.loaded(ff.write(tmp_path, version)) as p:
            handle = adapter.create(p, "legacy", rank=1, world=4, max_tokens=8, hidden=H, dtype=BF16, group=GROUP,
                                    device=torch.device("cpu"))
            t = _tensors(3)
            fn, args, kwargs = adapter.fusion_call(
                handle, pattern_code=1, oneshot=adapter.use_oneshot("auto", 3, handle), x=t["x"], allreduce_out=None,
                residual_in=t["res"], residual_out=t["res_out"], norm_out=t["out"], quant_out=None, gamma=t["w"],
                eps=1e-6, scale=None)
            names = list(ff.recorded_signature(version, fa.LEGACY_FUSION).parameters)
            seen[version] = dict(zip(names, args))
            assert len(args) == 21 and kwargs == {}  # every parameter is required in both: all by position
            assert args[0] is t["x"]
    assert list(seen["0.2.8"])[7:9] == ["use_oneshot", "trigger_completion_at_end"]
    assert list(seen["0.2.9"])[7:11] == ["trigger_completion_at_end", "fp32_acc", "pattern_code", "use_oneshot"]
    for version, values in seen.items():
        assert values["trigger_completion_at_end"] is True and values["world_rank"] == 1
    assert seen["0.2.8"]["use_oneshot"] is True  # 0.2.8 needs a bool: arfuse decides
    assert seen["0.2.9"]["use_oneshot"] is None  # 0.2.9+ asks FlashInfer's heuristic


def test_auto_decides_itself_where_flashinfer_cannot(tmp_path):
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p:
        handle = adapter.create(p, "unified", rank=0, world=16, max_tokens=8, hidden=H, dtype=BF16, group=None,
                                device=torch.device("cpu"))
        assert adapter.use_oneshot("auto", 128, handle) is True  # its heuristic table has no world size 16
        assert adapter.use_oneshot("auto", 129, handle) is False


@pytest.mark.parametrize("mode", ["wrapped", "text", "bare", "typeerror"])
def test_signature_less_release_still_binds(tmp_path, mode):
    version = "0.7.2.post1"
    with ff.loaded(ff.write(tmp_path, version, signature_less=mode)) as p:
        path = p.path_for(False)
        handle = adapter.create(p, path, rank=0, world=2, max_tokens=8, hidden=H, dtype=BF16, group=GROUP,
                                device=torch.device("cpu"))
        t = _tensors(4)
        fn, args, kwargs = adapter.fusion_call(
            handle, pattern_code=1, oneshot=adapter.use_oneshot("auto", 4, handle), x=t["x"], allreduce_out=None,
            residual_in=t["res"], residual_out=t["res_out"], norm_out=t["out"], quant_out=None, gamma=t["w"],
            eps=1e-6, scale=None)
        fn(*args, **kwargs)
        name, args, kwargs = ff.calls()[-1]
        bound = _bind(version, name, args, kwargs)
        assert bound["trigger_completion_at_end"] is True and isinstance(bound["use_oneshot"], (bool, type(None)))
        if p.functions[name].conservative:
            assert args == () and set(kwargs) <= set(fa.CONSERVATIVE[name])


# -- the backend and the manager --------------------------------------------------------------------------------
def _caps(p, world=1, **kw):
    kw.setdefault("allow_unverified", True)  # the rules of the adapter, not the verification record
    return GroupCaps(world_size=world, rank=0, device_type=kw.pop("device_type", "cpu"),
                     facts={"flashinfer": {"flashinfer": p}}, **kw)


@pytest.mark.parametrize("version", ff.versions())
def test_backend_runs_every_pattern_on_the_preferred_api(tmp_path, version):
    with ff.loaded(ff.write(tmp_path, version)) as p:
        backend = FlashInferBackend(WorkspaceManager())
        ws = backend.prepare(Capacity(16, H, BF16, torch.device("cpu")), _caps(p), GROUP)
        assert ws.handle.path == p.path_for(False)
        fusion_name = fa.FUNCTIONS[ws.handle.path][1]
        for pattern in Pattern:
            if pattern is Pattern.RESIDUAL_RMSNORM_FP8 and not p.flags(ws.handle.path)["fp8_scale_tensor"]:
                continue
            t = _tensors(5)
            out = torch.empty(5, H, dtype=torch.float8_e4m3fn) if pattern is Pattern.RESIDUAL_RMSNORM_FP8 else t["out"]
            backend.run(ws, "auto", pattern.spec, FusedCall(
                t["x"], out, residual=t["res"] if pattern.has_residual else None, weight=t["w"], eps=1e-5,
                scale=t["scale"], residual_out=t["res_out"] if pattern.has_residual else None))
            name, args, kwargs = ff.calls()[-1]
            assert name == fusion_name
            b = _bind(version, name, args, kwargs)
            assert b.get("pattern", b.get("pattern_code")) == CODES[pattern]
            if pattern is Pattern.ALLREDUCE:
                assert b.get("output", b.get("allreduce_out")) is out and b["residual_in"] is None
            elif pattern is Pattern.RMSNORM:  # zero residual from the workspace, residual output discarded
                assert b["norm_out"] is out and not b["residual_in"].any() and b["residual_in"].shape == (5, H)
                assert b["residual_out"].data_ptr() == ws.scratch.data_ptr()
            elif pattern is Pattern.RESIDUAL_RMSNORM:
                assert b["norm_out"] is out and b["residual_in"] is t["res"] and b["residual_out"] is t["res_out"]
            else:  # FlashInfer's scale_factor is arfuse's dequantization scale: passed unchanged
                assert b["quant_out"] is out and b["scale_factor"] is t["scale"] and b["norm_out"] is None
        ws.close()
        ws.close()
        assert not any(c[0] in ("workspace.destroy", fa.LEGACY_DESTROY) for c in ff.calls())  # parked
        assert backend.free_idle() == 1 and backend.free_idle() == 0
        assert sum(c[0] in ("workspace.destroy", fa.LEGACY_DESTROY) for c in ff.calls()) == 1


def test_manager_reuses_grows_and_destroys(tmp_path):
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p:
        m = WorkspaceManager()
        cpu = torch.device("cpu")

        def creates():
            return [c[2]["max_token_num"] for c in ff.calls() if c[0] == fa.UNIFIED_CREATE]

        a = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=64, hidden=H, probe=p)
        b = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=32, hidden=H, probe=p)  # fits: reused
        assert a is b and a.refs == 2 and creates() == [64]
        c = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=128, hidden=H, probe=p)  # grows
        assert c is not a and creates() == [64, 128]
        m.release(a)
        m.release(b)  # the superseded workspace goes with its last user
        assert a.handle.destroyed and not c.handle.destroyed
        m.release(c)
        assert not c.handle.destroyed and m.live() == {c.key: c}  # parked for the next fusion object
        d = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p)  # the parked one, reused
        assert d is c and d.refs == 1 and creates() == [64, 128]
        m.release(d)
        assert m.destroy_parked() == 1 and c.handle.destroyed and m.live() == {}
        d = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p)  # never shrinks
        assert creates() == [64, 128, 128]
        other = m.acquire(GROUP, dtype=torch.float16, device=cpu, max_tokens=16, hidden=H, probe=p)
        assert other is not d  # one workspace per dtype
        m.release(d)
        m.release(other)
        assert m.destroy_parked() == 2 and d.handle.destroyed and other.handle.destroyed


def test_manager_parks_per_hidden_size_and_never_reuses_a_workspace_a_call_failed_on(tmp_path):
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p:
        m = WorkspaceManager()
        cpu = torch.device("cpu")
        a = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p)
        b = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=2 * H, probe=p)
        m.release(a)
        m.release(b)
        assert not a.handle.destroyed and not b.handle.destroyed and len(m.live()) == 2  # both parked
        assert m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p) is a
        a.suspect = True  # what FlashInferBackend.run marks when a FlashInfer call raises
        m.release(a)
        assert a.handle.destroyed and len(m.live()) == 1  # destroyed with its last user, not parked
        c = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p)
        assert c is not a and not c.suspect
        m.release(c)
        assert m.destroy_parked() == 2


def test_reused_workspace_is_held_before_the_vote(tmp_path, monkeypatch):
    # destroy_parked() from another thread while the ranks vote on reuse must not take the workspace away
    from arfuse.backends import flashinfer_workspace as fw

    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p:
        m = WorkspaceManager()
        cpu = torch.device("cpu")
        a = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p)
        m.release(a)
        agree = fw.vote.agree

        def agree_while_another_thread_frees(ok, reason, group):
            m.destroy_parked()
            return agree(ok, reason, group)

        monkeypatch.setattr(fw.vote, "agree", agree_while_another_thread_frees)
        again = m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=16, hidden=H, probe=p)
        assert again is a and not a.handle.destroyed and a.refs == 1


def test_manager_refuses_what_it_cannot_drive(tmp_path):
    cpu = torch.device("cpu")
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1", extra_required="new_required_flag: bool")) as p:
        m = WorkspaceManager()
        with pytest.raises(WorkspaceUnavailable, match="new_required_flag"):
            m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=8, hidden=H, probe=p, strict=False)
        with pytest.raises(FallbackError, match="new_required_flag"):
            m.acquire(GROUP, dtype=BF16, device=cpu, max_tokens=8, hidden=H, probe=p, strict=True)
        assert not [c for c in ff.calls() if "create" in c[0]]  # refused before FlashInfer was called
    with ff.loaded(ff.write_broken(tmp_path, "import")) as p:
        with pytest.raises(WorkspaceUnavailable, match="CUDA driver too old"):
            WorkspaceManager().acquire(GROUP, dtype=BF16, device=cpu, max_tokens=8, hidden=H, probe=p,
                                       strict=False)


def test_check_rules(tmp_path):
    backend = FlashInferBackend(WorkspaceManager())
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p, ff.loaded(ff.write(tmp_path, "0.2.8")) as old:
        good = _caps(p, 4, device_type="cuda", sm=(9, 0), p2p=True)

        def why(caps=good, tokens=1, hidden=4096, dtype=BF16, pattern=Pattern.RESIDUAL_RMSNORM, world=4,
                variant="auto", device="cuda"):
            return backend.check(Problem(pattern, tokens, hidden, dtype, device, world), caps, variant)

        assert why() is None and why(dtype=torch.float32, hidden=4100) is None
        assert all(why(pattern=pt) is None for pt in Pattern)
        assert "device cpu" in why(device="cpu")
        assert "world size 3" in why(world=3)
        assert "multiple of 8" in why(hidden=4100)
        assert "sm80" in why(caps=_caps(p, 4, device_type="cuda", sm=(8, 0), p2p=True))
        assert "p2p" in why(caps=_caps(p, 4, device_type="cuda", sm=(9, 0), p2p=False))
        assert "not probed" in why(caps=_caps(None, 4, device_type="cuda", sm=(9, 0), p2p=True))
        old_caps = _caps(old, 4, device_type="cuda", sm=(10, 0), p2p=True)
        assert "FP8" in why(caps=old_caps, pattern=Pattern.RESIDUAL_RMSNORM_FP8)
        assert why(caps=old_caps) is None
        limit = max_bytes((9, 0), 4) // (4096 * 2)
        assert why(tokens=limit) is None and "exceeds" in why(tokens=limit + 1)
        for v in backend.variants:  # monotone in tokens, as selection's bisection needs
            flags = [why(tokens=n, variant=v) is not None for n in range(1, 2 * limit, max(1, limit // 50))]
            assert flags == sorted(flags)


# -- fresh interpreters -----------------------------------------------------------------------------------------
def test_import_and_doctor_never_fail(tmp_path):
    fakes = {"recorded": ff.write(tmp_path, "0.7.2.post1"), "legacy": ff.write(tmp_path, "0.2.8"),
             "import": ff.write_broken(tmp_path, "import"), "attribute": ff.write_broken(tmp_path, "attribute")}
    procs = {}
    for label, directory in fakes.items():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), str(REPO)]))
        procs[label] = subprocess.Popen([sys.executable, "-m", "arfuse.cli.doctor", "--json"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fakes["import"]), str(REPO)]))
    plain = subprocess.run([sys.executable, "-c", "import sys, arfuse; assert 'flashinfer' not in sys.modules"],
                           env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    reports = {}
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{label}: {err}"
        reports[label] = json.loads(out)
    for label, report in reports.items():
        fi = report["backends"]["flashinfer"]
        assert set(fi["supports"]) >= {"group", "comm_backend", "trigger_completion_at_end",
                                       "block_quant_group_size", "weight_bias"}
        assert fi["available"] is False and fi["reason"]  # no GPU here, and the reason says so
        assert report["backends"]["torch_ref"]["available"] is True and "device" in report
    assert (reports["recorded"]["backends"]["flashinfer"]["version"],
            reports["recorded"]["backends"]["flashinfer"]["api"]) == ("0.7.2.post1", "both")
    assert all(reports["recorded"]["backends"]["flashinfer"]["supports"][f] for f in
               ("group", "comm_backend", "trigger_completion_at_end", "block_quant_group_size", "weight_bias"))
    assert reports["legacy"]["backends"]["flashinfer"]["api"] == "legacy"
    fusions = {label: reports[label]["backends"]["flashinfer"]["fusions"] for label in ("recorded", "legacy")}
    assert fusions["recorded"]["residual_rmsnorm+fp8_per_token"] == "kARResidualRMSNormDynamicFP8Quant (unified)"
    assert "no AllReduceFusionPattern.kARResidualRMSNormDynamicFP8Quant" in \
        fusions["legacy"]["residual_rmsnorm+fp8_per_token"]
    assert fusions["legacy"]["moe_finalize+residual_rmsnorm"] == "trtllm_moe_finalize_allreduce_fusion (legacy)"
    assert "RuntimeError" in reports["import"]["backends"]["flashinfer"]["probe_reason"]
    assert reports["attribute"]["backends"]["flashinfer"]["api"] is None


def test_a_failing_flashinfer_call_marks_its_workspace(tmp_path, monkeypatch):
    with ff.loaded(ff.write(tmp_path, "0.7.2.post1")) as p:
        backend = FlashInferBackend(WorkspaceManager())
        ws = backend.prepare(Capacity(16, H, BF16, torch.device("cpu")), _caps(p), GROUP)

        def launch_error(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(adapter, "fusion_call", lambda *a, **k: (launch_error, (), {}))
        t = _tensors(5)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            backend.run(ws, "auto", Pattern.RESIDUAL_RMSNORM.spec, FusedCall(
                t["x"], t["out"], residual=t["res"], weight=t["w"], eps=1e-5, residual_out=t["res_out"]))
        assert ws.shared.suspect
        handle = ws.handle
        ws.close()
        assert handle.destroyed and backend.manager.live() == {}  # not parked for the next object
