"""The public API in one process (world size 1, no process group): results against the float64 reference,
lifecycle (context manager, idempotent close, close on garbage collection and at interpreter exit),
introspection, the functional forms' cache and the module drop-in."""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import arfuse
from arfuse import functional as F, fusions
from arfuse.core.types import Pattern, Plan
from arfuse.verify import TOLERANCE, Case, reference, rel_err
from tests._ranks import OBJECT_CALLS_PER_EXERCISE, RECORDS_PER_EXERCISE, check_records, exercise

REPO = Path(arfuse.__file__).resolve().parent.parent


def test_public_surface_is_small_and_importable():
    assert len(arfuse.__all__) <= 24  # every name is a contract: add one deliberately
    for name in arfuse.__all__:
        assert getattr(arfuse, name) is not None, name
    assert arfuse.Pattern.RESIDUAL_RMSNORM.has_residual and not arfuse.Pattern.RMSNORM.has_residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_op_matches_reference_at_world_size_1(dtype):
    with arfuse.AllReduceFusion(max_tokens=40, hidden_size=48, dtype=dtype, device="cpu") as fusion:
        records = []
        for i, tokens in enumerate((1, 13, 40)):
            records += exercise(fusion, Case(tokens, 48, dtype, seed=i), rank=0, world=1)
        assert check_records([records], str(dtype)) == 3 * RECORDS_PER_EXERCISE
        assert fusion.stats()["calls"] == {"torch_ref": 3 * OBJECT_CALLS_PER_EXERCISE}
        assert fusion.caps.world_size == 1 and fusion.caps.dist_backend is None
    F.close_all()


def test_outputs_keep_input_dtype_and_math_is_fp32():
    case = Case(5, 64, torch.bfloat16, seed=9)
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=64, dtype=torch.bfloat16, device="cpu") as fusion:
        norm, res = fusion.residual_rmsnorm(case.x(0), case.residual(), case.weight(), case.eps)
    assert norm.dtype == res.dtype == torch.bfloat16
    s = case.x(0).float() + case.residual().float()  # the norm is of the fp32 sum, not of the rounded residual
    expected = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + case.eps) * case.weight().float()).bfloat16()
    assert torch.equal(norm, expected)
    assert torch.equal(res, s.bfloat16())


def test_lifecycle_context_manager_and_idempotent_close():
    with arfuse.AllReduceFusion(max_tokens=4, hidden_size=8, dtype=torch.float32, device="cpu") as fusion:
        assert not fusion.closed and "torch_ref" in fusion.backends
        assert "world_size=1" in repr(fusion)
    assert fusion.closed and "closed" in repr(fusion)
    fusion.close()
    fusion.close()
    assert fusion.closed


def test_garbage_collected_object_closes_its_workspaces():
    fusion = arfuse.AllReduceFusion(max_tokens=4, hidden_size=8, dtype=torch.float32, device="cpu")
    workspaces = [ws for ws in fusion._executor.workspaces.values()]
    del fusion
    gc.collect()
    assert workspaces and all(ws.closed for ws in workspaces)


def test_interpreter_exit_closes_open_objects(tmp_path):
    marker = tmp_path / "released"
    script = textwrap.dedent(f"""
        import torch, arfuse
        from arfuse.backends.base import register
        from arfuse.backends.torch_ref import RefWorkspace, TorchRefBackend

        class Recording(RefWorkspace):
            def _release(self):
                open({str(marker)!r}, "w").write("released")

        class RecordingRef(TorchRefBackend):
            name = "test_recording"
            def prepare(self, capacity, caps, group):
                return Recording(group, caps.world_size)

        register(RecordingRef())
        keep = arfuse.AllReduceFusion(max_tokens=4, hidden_size=8, dtype=torch.float32, device="cpu",
                                      backend="test_recording")
        assert not keep.closed
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "released"


def test_stats_plan_and_introspection():
    with arfuse.AllReduceFusion(max_tokens=16, hidden_size=8, dtype=torch.float32, device="cpu",
                                backend="torch_ref") as fusion:
        fusion.all_reduce(torch.ones(3, 8))
        fusion.rmsnorm(torch.ones(3, 8), torch.ones(8))
        stats = fusion.stats()
        assert stats == {"calls": {"torch_ref": 2}, "fallbacks": {}, "errors": {}}
        assert "torch_ref" in str(stats) and "2" in str(stats)
        fusion.reset_stats()
        assert fusion.stats()["calls"] == {}
        for pattern in (Pattern.RESIDUAL_RMSNORM, "rmsnorm", "ALLREDUCE", "residual_rmsnorm_fp8"):
            plan = fusion.plan(pattern, 16)
            assert isinstance(plan, Plan) and plan.backend == "torch_ref" and not plan.fallback
        assert fusion.disabled == {}
        assert fusion.input_buffer(4) is None  # the reference path copies its input itself
        fusion.check_health()


def test_all_reduce_at_world_size_1_is_a_copy_into_a_new_tensor():
    x = torch.randn(3, 8)
    with arfuse.AllReduceFusion(max_tokens=4, hidden_size=8, dtype=torch.float32, device="cpu") as fusion:
        out = fusion.all_reduce(x)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_functional_forms_cache_and_regrow_their_object():
    F.close_all()
    case = Case(3, 32, torch.float32, seed=11)
    F.rmsnorm(case.x(0), case.weight())
    (key, (_, first)), = fusions._entries.items()
    assert first.capacity.max_tokens == 4
    F.all_reduce(case.x(0))
    assert fusions._entries[key][1] is first  # reused
    big = Case(9, 32, torch.float32, seed=12)
    norm, res = F.residual_rmsnorm(big.x(0), big.residual(), big.weight(), big.eps)
    ref_norm, ref_res = reference(big, 1, Pattern.RESIDUAL_RMSNORM)
    assert max(rel_err(norm, ref_norm), rel_err(res, ref_res)) <= TOLERANCE[torch.float32]
    grown = fusions._entries[key][1]
    assert grown is not first and grown.capacity.max_tokens == 16
    assert not first.closed  # outgrown, kept open for a thread that may still hold it
    F.close_all()
    assert grown.closed and first.closed and not fusions._entries and not fusions._retired


SAME_GROUP = """
import sys, tempfile, torch, torch.distributed as dist
import arfuse.functional as F
from arfuse import fusions
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
x, w = torch.randn(3, 32), torch.rand(32)
for group in (None, dist.group.WORLD) * 3:
    F.rmsnorm(x, w, group=group)
assert len(fusions._entries) == 1 and not fusions._retired, (fusions._entries, fusions._retired)
other = dist.new_group([0])  # the same ranks, another communicator: an object of its own
for group in (other, None, other):
    F.rmsnorm(x, w, group=group)
assert len(fusions._entries) == 2 and not fusions._retired, (fusions._entries, fusions._retired)
made = list(fusions.cached())
F.close_all()
assert all(f.closed for f in made) and not fusions._entries
dist.destroy_process_group()
print("ok")
"""


def test_functional_forms_share_one_object_per_process_group():
    # group=None and the default group are one group; two groups of the same ranks are two
    out = subprocess.run([sys.executable, "-c", SAME_GROUP], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_functional_regrow_that_fails_keeps_the_cached_object(monkeypatch):
    F.close_all()
    case = Case(3, 32, torch.float32, seed=11)
    F.rmsnorm(case.x(0), case.weight())
    (key, (_, first)), = fusions._entries.items()

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(fusions, "AllReduceFusion", failing)
    big = Case(9, 32, torch.float32, seed=12)
    with pytest.raises(RuntimeError, match="injected"):
        F.rmsnorm(big.x(0), big.weight())
    assert fusions._entries[key][1] is first and not first.closed
    F.rmsnorm(case.x(0), case.weight())  # calls that fit still work
    F.close_all()


def test_module_drop_in_shapes_inplace_and_repr():
    case = Case(6, 16, torch.float32, seed=13)
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu") as fusion:
        norm = arfuse.FusedAddRMSNorm(16, eps=case.eps, fusion=fusion, inplace_residual=True)
        with torch.no_grad():
            norm.weight.copy_(case.weight())
        residual = case.residual().view(2, 3, 16)
        y, r = norm(case.x(0).view(2, 3, 16), residual)
        assert r is residual and y.shape == (2, 3, 16)
        ref_norm, ref_res = reference(case, 1, Pattern.RESIDUAL_RMSNORM)
        assert rel_err(y.reshape(6, 16), ref_norm) <= TOLERANCE[torch.float32]
        assert rel_err(residual.reshape(6, 16), ref_res) <= TOLERANCE[torch.float32]
        assert "inplace_residual=True" in repr(norm)
        assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_readme_snippet_runs(capsys):
    snippet = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[0]
    exec(compile(snippet, "README.md", "exec"), {})
    assert "torch_ref" in capsys.readouterr().out


def test_readme_patterns_snippet_runs(capsys):
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
                  if "moe_finalize_residual_rmsnorm(" in s]
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["torch.float8_e4m3fn", "torch.Size([16,", "2])", "(1,", "16)",
                                               "torch.bfloat16"]


def test_free_idle_workspaces_asks_every_registered_backend(monkeypatch):
    from arfuse.backends import base

    freed = {b.name: i for i, b in enumerate(base.registered(), start=1)}
    for b in base.registered():
        monkeypatch.setattr(b, "free_idle", lambda n=freed[b.name]: n)
    assert arfuse.free_idle_workspaces() == sum(freed.values())
    monkeypatch.undo()
    assert arfuse.free_idle_workspaces() == 0  # nothing parked in this process


@pytest.mark.parametrize("pattern", list(arfuse.Pattern))
def test_checked_call_passes_the_oracle_and_catches_unwritten_outputs(pattern):
    from arfuse.verify import checked_call

    case = Case(5, 64, torch.bfloat16, seed=3)
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=64, dtype=torch.bfloat16, device="cpu") as fusion:
        good = checked_call(fusion, pattern, case, 0, 1, "cpu")
    assert good.within_tolerance and len(good.digest) == 64

    class WritesNothing:  # returns the caller's (poisoned) outputs untouched
        def all_reduce(self, x, out):
            return out

        def rmsnorm(self, x, w, eps, out):
            return out

        def residual_rmsnorm(self, x, r, w, eps, norm_out, residual_out):
            return norm_out, residual_out

        def residual_rmsnorm_fp8(self, x, r, w, scale, eps, quant_out, residual_out):
            return quant_out, residual_out

    bad = checked_call(WritesNothing(), pattern, case, 0, 1, "cpu")
    assert bad.err == float("inf") and not bad.within_tolerance


def test_module_rejects_a_residual_it_could_not_update_in_place():
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu") as fusion:
        norm = arfuse.FusedAddRMSNorm(16, fusion=fusion, inplace_residual=True)
        x = torch.randn(2, 3, 16)
        strided = torch.randn(2, 16, 3).transpose(1, 2)  # x's shape, not contiguous
        with pytest.raises(ValueError, match="residual must be contiguous"):
            norm(x, strided)
        with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 3, 16\), got \(6, 16\)"):
            norm(x, torch.randn(6, 16))
        residual = torch.randn(2, 3, 16)
        before = residual.clone()
        _, out = norm(x, residual)
        assert out is residual and not torch.equal(residual, before)  # updated where the caller holds it


def test_introspection_and_module_arguments_are_checked():
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu") as fusion:
        with pytest.raises(TypeError, match="plan: num_tokens must be an int"):
            fusion.plan("residual_rmsnorm", 2.0)
        from arfuse.core.spec import FusionSpec, Prologue

        assert fusion.input_buffer(4, FusionSpec(prologue=Prologue.MOE_FINALIZE)) is None
        experts, idx = torch.randn(4, 16), torch.zeros(2, 1, dtype=torch.int32)
        with pytest.raises(ValueError, match="moe_finalize_residual_rmsnorm: also_norm=True needs a quant="):
            fusion.moe_finalize_residual_rmsnorm(experts, idx, torch.ones(2, 1), torch.randn(2, 16),
                                                 torch.ones(16), also_norm=True)
        with pytest.raises(ValueError, match="expert_out has no rows"):
            fusion.moe_finalize_residual_rmsnorm(experts[:0], idx, torch.ones(2, 1), torch.randn(2, 16),
                                                 torch.ones(16))
        norm = arfuse.FusedAddRMSNorm(16, fusion=fusion)
        with pytest.raises(TypeError, match="FusedAddRMSNorm: x must be a torch.Tensor"):
            norm("abc")
        with pytest.raises(ValueError, match="0-D"):
            norm(torch.tensor(1.0))
        assert fusion.stats()["calls"] == {}
