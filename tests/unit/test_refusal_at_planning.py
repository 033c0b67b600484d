"""A backend's refusal happens when the call is planned, with its reason, never inside ``run``: a refused MoE
finalize call (too many expert rows for the path) runs on another path, counted as a plan and not as an error,
and the path stays enabled for the calls it takes.

A test-only backend stands in for FlashInfer before 0.6.15 (whose MoE finalize counts the permuted expert rows
against its one-shot limit), so the executor's side runs on CPU; FlashInfer's own ``check`` is checked with the
fake FlashInfer of ``tests/unit/fake_flashinfer.py``.
"""
from __future__ import annotations

import pytest
import torch

import arfuse
from arfuse.backends import flashinfer as fib
from arfuse.backends.flashinfer import FlashInferBackend
from arfuse.backends.flashinfer_workspace import WorkspaceManager
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.core.spec import FusionSpec, Prologue
from arfuse.core.types import GroupCaps, Problem
from arfuse.testing.faults import registered
from tests.unit import fake_flashinfer as ff

HIDDEN, MAX_ROWS, TOP_K = 32, 12, 2
MOE = FusionSpec(prologue=Prologue.MOE_FINALIZE)


class RowsCapped(TorchRefBackend):
    """The reference math under its own name, refusing MoE calls of more than MAX_ROWS expert rows in ``check``;
    ``run`` fails the test if such a call ever reaches it."""

    name = "test_rows_capped"
    priority = 10
    needs_prepare_vote = True

    def __init__(self):
        self.too_many_reached_run = 0

    def check_variant(self, problem, caps, variant):
        if problem.spec.moe and problem.expert_rows > MAX_ROWS:
            return f"test cap: MoE finalize of more than {MAX_ROWS} expert rows"
        return None

    def run(self, ws, variant, spec, call):
        if spec.moe and call.x.shape[0] > MAX_ROWS:
            self.too_many_reached_run += 1
            raise RuntimeError("test: a refused call reached run")
        return super().run(ws, variant, spec, call)


@pytest.fixture
def capped():
    backend = RowsCapped()
    with registered(backend):
        yield backend


def _moe_call(fusion, tokens: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    expert_out = torch.randn(rows, HIDDEN, generator=g)
    idx = torch.randint(0, rows, (tokens, TOP_K), generator=g, dtype=torch.int32)
    scales = torch.rand(tokens, TOP_K, generator=g)
    residual, weight = torch.randn(tokens, HIDDEN, generator=g), torch.rand(HIDDEN, generator=g) + 0.5
    out = fusion.moe_finalize_residual_rmsnorm(expert_out, idx, scales, residual, weight, 1e-6)
    x = (scales.unsqueeze(-1) * expert_out[idx.long()]).sum(1)
    s = x + residual
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert torch.allclose(out.norm, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.residual, s, rtol=1e-6, atol=1e-6)


def _fusion(backend, strict=None):
    return arfuse.AllReduceFusion(max_tokens=16, hidden_size=HIDDEN, dtype=torch.float32, device="cpu",
                                  backend=backend, strict=strict)


def test_auto_plans_around_a_path_that_refuses_the_rows_and_keeps_it(capped):
    with _fusion("auto") as fusion:
        assert fusion.plan(MOE, 4).backend == "test_rows_capped"
        _moe_call(fusion, 4, MAX_ROWS)
        _moe_call(fusion, 4, MAX_ROWS + 1, seed=1)  # refused when planned: the reference runs it
        _moe_call(fusion, 4, MAX_ROWS + 1, seed=2)  # the same problem again: planned once, same route
        _moe_call(fusion, 8, MAX_ROWS - 4, seed=3)  # the capped path takes this one again
        stats = fusion.stats()
        assert capped.too_many_reached_run == 0
        assert stats["calls"] == {"test_rows_capped": 2, "torch_ref": 2}
        assert stats["errors"] == {} and fusion.disabled == {}
        assert not stats["fallbacks"]  # auto choosing another path is not a fallback


def test_named_path_falls_back_with_the_reason_or_raises_in_strict(capped):
    with _fusion("test_rows_capped", strict=False) as fusion:
        _moe_call(fusion, 4, MAX_ROWS + 5)
        _moe_call(fusion, 4, MAX_ROWS)
        stats = fusion.stats()
        assert stats["calls"] == {"torch_ref": 1, "test_rows_capped": 1} and stats["errors"] == {}
        (reason, n), = stats["fallbacks"].items()
        assert n == 1 and f"more than {MAX_ROWS} expert rows" in reason
        assert fusion.disabled == {}
    with _fusion("test_rows_capped", strict=True) as fusion:
        with pytest.raises(arfuse.FallbackError, match="expert rows"):
            _moe_call(fusion, 4, MAX_ROWS + 5)
        _moe_call(fusion, 4, MAX_ROWS)  # not disabled: the refusal was a plan, not a failure
        assert fusion.stats()["calls"] == {"test_rows_capped": 1} and capped.too_many_reached_run == 0


def _flashinfer_caps(probe) -> GroupCaps:
    return GroupCaps(world_size=4, rank=0, device_type="cuda", sm=(9, 0), single_host=True, p2p=True,
                     facts={"flashinfer": {"flashinfer": probe}}, allow_unverified=True)


def test_flashinfer_refuses_too_many_expert_rows_in_check_before_0_6_15(tmp_path):
    hidden = 256
    rows = fib.adapter.MAX_COMM_SIZE // (hidden * 2 * 4) + 1
    backend = FlashInferBackend(WorkspaceManager())

    def why(probe, expert_rows, tokens=8):
        problem = Problem(MOE, tokens, hidden, torch.bfloat16, "cuda", 4, expert_rows=expert_rows)
        return backend.check(problem, _flashinfer_caps(probe), "oneshot")

    with ff.loaded(ff.write(tmp_path, "0.6.12")) as old:
        assert "counts the permuted rows" in why(old, rows)
        assert why(old, rows - 1) is None
        assert why(old, 0) is None  # the per-token-count tables: rows unknown, decided per call
    with ff.loaded(ff.write(tmp_path, "0.7.4")) as new:
        assert why(new, rows) is None and why(new, 50 * rows) is None
