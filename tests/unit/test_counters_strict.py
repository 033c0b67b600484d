"""Which path ran: counters count what ran; every fallback is counted and logged once; strict mode (per object,
``arfuse.strict`` and ``ARFUSE_STRICT=1``) turns each fallback into :class:`FallbackError`.

Test-only backends stand in for the fast paths so every case runs on CPU: one refuses more than SMALL tokens,
one supports only CUDA, one fails in ``prepare``, one raises in ``run``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arfuse
from arfuse.backends.base import Support
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.core.types import Pattern
from arfuse.testing.faults import registered
from arfuse.verify import TOLERANCE, Case, reference, rel_err
from tests._ranks import SMALL, SmallOnly

HIDDEN = 32
REPO = Path(arfuse.__file__).resolve().parent.parent




class CudaOnly(TorchRefBackend):
    name = "test_cuda_only"
    priority = 20
    needs_prepare_vote = True
    support = Support(devices=frozenset({"cuda"}), dtypes=frozenset({torch.float32, torch.bfloat16}))


class PrepareFails(TorchRefBackend):
    name = "test_prepare_fails"
    priority = 5
    needs_prepare_vote = True

    def prepare(self, capacity, caps, group):
        raise RuntimeError("test: no buffers today")


class RunFails(TorchRefBackend):
    name = "test_run_fails"
    priority = 5
    needs_prepare_vote = True

    def run(self, ws, variant, spec, call):
        call.out.fill_(0.0)  # partial output that must never be returned as valid
        raise RuntimeError("test: launch failed")




@pytest.fixture
def backends():
    """The size-capped and the CUDA-only test backends."""
    with registered(SmallOnly(), CudaOnly()):
        yield


@pytest.fixture
def failing_backends():
    """Backends that fail in prepare and in run, beside the size-capped one."""
    with registered(SmallOnly(), PrepareFails(), RunFails()):
        yield


def _fusion(backend, strict=None, max_tokens=32):
    return arfuse.AllReduceFusion(max_tokens=max_tokens, hidden_size=HIDDEN, dtype=torch.float32, device="cpu",
                                  backend=backend, strict=strict)


def _checked_call(fusion, tokens, seed=0):
    case = Case(tokens, HIDDEN, torch.float32, seed)
    norm, res = fusion.residual_rmsnorm(case.x(0), case.residual(), case.weight(), case.eps)
    ref_norm, ref_res = reference(case, 1, Pattern.RESIDUAL_RMSNORM)
    assert max(rel_err(norm, ref_norm), rel_err(res, ref_res)) <= TOLERANCE[torch.float32]


def test_named_backend_runs_what_it_can_and_falls_back_counted_and_logged_once(backends, caplog):
    caplog.set_level(logging.WARNING, logger="arfuse")
    with _fusion("test_small_only", strict=False) as fusion:
        for n in (1, SMALL, SMALL + 1, 20, 32, 3):
            _checked_call(fusion, n, seed=n)
        stats = fusion.stats()
    assert stats["calls"] == {"test_small_only": 3, "torch_ref": 3}
    (reason, n), = stats["fallbacks"].items()
    assert n == 3 and "test_small_only" in reason and f"test cap: more than {SMALL} tokens" in reason
    logged = [r for r in caplog.records if "test cap" in r.getMessage()]
    assert len(logged) == 1 and logged[0].name == "arfuse"
    assert "torch_ref" in logged[0].getMessage()
    assert "test cap" in str(stats)


def test_strict_object_raises_fallback_error_naming_backend_and_reason(backends):
    with _fusion("test_small_only", strict=True) as fusion:
        _checked_call(fusion, SMALL)
        with pytest.raises(arfuse.FallbackError, match="test cap") as info:
            _checked_call(fusion, SMALL + 1)
        assert info.value.backend == "test_small_only" and "test cap" in info.value.reason
        assert fusion.stats()["calls"] == {"test_small_only": 1} and not fusion.stats()["fallbacks"]


def test_backend_that_cannot_run_on_cpu_falls_back_or_raises_in_strict(backends):
    with _fusion("test_cuda_only", strict=False) as fusion:
        _checked_call(fusion, 4)
        plan = fusion.plan("residual_rmsnorm", 4)
        assert plan.backend == "torch_ref" and plan.fallback and "device cpu not supported" in plan.reason
        assert fusion.stats()["calls"] == {"torch_ref": 1}
        (reason, n), = fusion.stats()["fallbacks"].items()
        assert n == 1 and "test_cuda_only" in reason
    # strict, a path that can run nothing here is refused when the object is built, not at its first call
    with pytest.raises(arfuse.FallbackError, match="test_cuda_only.*device cpu not supported"):
        _fusion("test_cuda_only", strict=True)
    with arfuse.strict(True), pytest.raises(arfuse.FallbackError, match="device cpu not supported"):
        _fusion("test_cuda_only")


def test_global_strict_switch_and_object_override(backends):
    assert not arfuse.strict.enabled()
    with arfuse.strict(True):
        assert arfuse.strict.enabled()
        with _fusion("test_small_only") as follows_global, _fusion("test_small_only", strict=False) as lenient:
            with pytest.raises(arfuse.FallbackError):
                _checked_call(follows_global, 20)
            _checked_call(lenient, 20)
            assert lenient.stats()["fallbacks"]
        with _fusion("auto") as auto:  # auto choosing another path is not a fallback
            _checked_call(auto, 20)
            assert auto.stats()["calls"] == {"torch_ref": 1} and not auto.stats()["fallbacks"]
    assert not arfuse.strict.enabled()


def test_env_var_turns_on_strict_mode():
    """``ARFUSE_STRICT=1`` sets the global switch at import; what the switch does is tested above."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import arfuse, sys; sys.exit(0 if arfuse.strict.enabled() else 3)"
    done = subprocess.run([sys.executable, "-c", code], env=dict(env, ARFUSE_STRICT="1"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_auto_picks_first_capable_by_priority_and_counts_each_path(backends):
    with _fusion("auto") as fusion:
        assert fusion.plan("residual_rmsnorm", SMALL).backend == "test_small_only"
        assert fusion.plan("residual_rmsnorm", SMALL + 1).backend == "torch_ref"
        for n in (4, SMALL, SMALL + 1, 32):
            _checked_call(fusion, n, seed=n)
        stats = fusion.stats()
    assert stats["calls"] == {"test_small_only": 2, "torch_ref": 2}
    assert not stats["fallbacks"] and not stats["errors"]


def test_auto_drops_failing_backends_counts_why_and_stays_correct(failing_backends):
    with _fusion("auto") as fusion:
        assert "test_prepare_fails" in fusion.disabled  # priority 5, but its prepare failed
        assert fusion.plan("residual_rmsnorm", 4).backend == "test_run_fails"  # fails only when it runs
        for n in (4, 4, 20):
            _checked_call(fusion, n, seed=n)  # the failed call is rerun on a prepared path
        stats = fusion.stats()
        assert "test_run_fails" in fusion.disabled
        # no rank may prepare on its own after construction, so the reruns use the prepared reference
        assert fusion.plan("residual_rmsnorm", 4).backend == "torch_ref"
    assert stats["calls"] == {"torch_ref": 3}
    assert any("test: launch failed" in reason for reason in stats["errors"])
    assert any("test_prepare_fails" in reason and "no buffers today" in reason for reason in stats["fallbacks"])
    assert any("test_run_fails" in reason for reason in stats["fallbacks"])


def test_failing_prepare_is_a_fallback_error_in_strict_mode(failing_backends):
    for requested in ("test_prepare_fails", "auto"):  # a disabled fast path is what strict mode exists to catch
        with pytest.raises(arfuse.FallbackError, match="no buffers today"):
            _fusion(requested, strict=True)
    with _fusion("test_prepare_fails", strict=False) as fusion:
        _checked_call(fusion, 4)
        assert fusion.stats()["calls"] == {"torch_ref": 1}
        assert "test_prepare_fails" in fusion.disabled


def test_failing_run_is_a_backend_error_in_strict_mode_never_a_silent_partial_result(failing_backends):
    with _fusion("test_run_fails", strict=True) as fusion:
        with pytest.raises(arfuse.BackendError, match="launch failed"):
            _checked_call(fusion, 4)
        assert fusion.stats()["errors"]
    with _fusion("test_run_fails", strict=False) as fusion:
        _checked_call(fusion, 4)  # rerun on the reference: correct, not the zeros the failed run left
        assert fusion.stats()["calls"] == {"torch_ref": 1}


def test_counters_are_per_object_and_reset(backends):
    with _fusion("torch_ref") as a, _fusion("test_small_only") as b:
        a.all_reduce(torch.ones(2, HIDDEN))
        b.all_reduce(torch.ones(2, HIDDEN))
        b.all_reduce(torch.ones(2, HIDDEN))
        assert a.stats()["calls"] == {"torch_ref": 1}
        assert b.stats()["calls"] == {"test_small_only": 2}
        b.reset_stats()
        assert b.stats() == {"calls": {}, "fallbacks": {}, "errors": {}}
        assert a.stats()["calls"] == {"torch_ref": 1}


def test_process_stats_sum_live_closed_and_collected_objects():
    import gc

    from arfuse.core.counters import Counters

    base = arfuse.stats()
    a, b = Counters(), Counters()
    a.count_call("test/path")
    b.count_call("test/path")
    b.count_fallback("test reason", 2)
    b.count_error("test error")
    now = arfuse.stats()
    assert now["calls"]["test/path"] == base["calls"].get("test/path", 0) + 2
    assert now["fallbacks"]["test reason"] == base["fallbacks"].get("test reason", 0) + 2
    a.reset()  # an object's reset leaves the process-wide totals alone
    del b
    gc.collect()  # a collected object's counts are kept
    after = arfuse.stats()
    assert after["calls"]["test/path"] == now["calls"]["test/path"]
    assert after["errors"]["test error"] == base["errors"].get("test error", 0) + 1
    assert a.snapshot()["calls"] == {}
    assert "test/path" in str(after)
