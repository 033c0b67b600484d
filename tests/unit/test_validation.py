"""Bad arguments, in one process (no process group): the error type, and a message that starts with the op name
and names the argument and the expectation. The multi-rank test proves the same checks run before any collective.
"""
from __future__ import annotations

import re

import pytest
import torch

import arfuse
from arfuse import functional as F
from tests._ranks import Good, bad_inputs, closed_calls, expect

OPS = re.compile(r"^(residual_rmsnorm_fp8|residual_rmsnorm_quant|residual_rmsnorm|rmsnorm|all_reduce|"
                 r"moe_finalize_residual_rmsnorm|FP8PerTokenGroup): ")


@pytest.fixture
def fusion():
    with arfuse.AllReduceFusion(max_tokens=Good.MAX, hidden_size=Good.H, dtype=torch.float32,
                                device="cpu") as f:
        yield f
    F.close_all()


@pytest.mark.parametrize("bad", bad_inputs(), ids=lambda b: b.label)
def test_bad_input_raises_named_error(fusion, bad):
    assert expect(bad, fusion, Good(3)) is None
    with pytest.raises(bad.error, match=OPS):
        bad.call(fusion, Good(3))


@pytest.mark.parametrize("bad", closed_calls(), ids=lambda b: b.label)
def test_closed_object_raises_value_error(bad):
    fusion = arfuse.AllReduceFusion(max_tokens=4, hidden_size=Good.H, dtype=torch.float32, device="cpu")
    fusion.close()
    assert expect(bad, fusion, Good(4)) is None


def test_rejected_calls_run_nothing(fusion):
    for bad in bad_inputs():
        expect(bad, fusion, Good(5))
    assert fusion.stats()["calls"] == {}


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(max_tokens=0), ValueError, "max_tokens must be > 0"),
    (dict(max_tokens=-3), ValueError, "max_tokens"),
    (dict(max_tokens=2.0), TypeError, "max_tokens must be an int"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an int"),
    (dict(hidden_size=0), ValueError, "hidden_size must be > 0"),
    (dict(hidden_size="8"), TypeError, "hidden_size must be an int"),
    (dict(dtype=torch.int8), TypeError, "dtype must be one of"),
    (dict(dtype=torch.float64), TypeError, "dtype must be one of"),
    (dict(backend="no_such_backend"), ValueError, "unknown backend 'no_such_backend'"),
    (dict(backend="torch_ref/no_such_variant"), ValueError, "no variant 'no_such_variant'"),
    (dict(backend=3), TypeError, "backend must be a str"),
    (dict(strict="yes"), TypeError, "strict must be a bool"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, words):
    args = dict(max_tokens=4, hidden_size=8, dtype=torch.float32, device="cpu")
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(words)):
        arfuse.AllReduceFusion(**args)


def test_other_entry_points_reject_bad_arguments(fusion):
    with pytest.raises(TypeError, match="fusion must be an AllReduceFusion"):
        arfuse.FusedAddRMSNorm(Good.H, fusion=None)
    with pytest.raises(TypeError, match="on must be a bool"):
        arfuse.strict("yes")
    for n in (0, Good.MAX + 1):
        with pytest.raises(ValueError, match=f"num_tokens must be in 1..{Good.MAX}"):
            fusion.plan("residual_rmsnorm", n)
        with pytest.raises(ValueError, match="input_buffer: num_tokens"):
            fusion.input_buffer(n)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        g = Good(6)
        fusion.residual_rmsnorm(g.x, g.residual, g.weight, inplace=1)


def test_zero_tokens_is_a_valid_no_op(fusion):
    x, w = torch.empty(0, Good.H), torch.ones(Good.H)
    residual = torch.empty(0, Good.H)
    norm, res = fusion.residual_rmsnorm(x, residual, w)
    quant, res8 = fusion.residual_rmsnorm_fp8(x, residual, w, 0.5)
    inplace_norm, inplace_res = fusion.residual_rmsnorm(x, residual, w, inplace=True)
    given = torch.empty(0, Good.H)
    outs = [norm, res, quant, res8, inplace_norm, fusion.rmsnorm(x, w, out=given), fusion.all_reduce(x),
            *F.residual_rmsnorm(x, residual, w), F.rmsnorm(x, w), F.all_reduce(x),
            *arfuse.FusedAddRMSNorm(Good.H, fusion=fusion)(x.view(1, 0, Good.H), residual.view(1, 0, Good.H))]
    assert all(o.numel() == 0 and o.shape[-1] == Good.H for o in outs)
    assert quant.dtype == torch.float8_e4m3fn and norm.dtype == torch.float32
    assert inplace_res is residual and outs[5] is given
    assert fusion.stats()["calls"] == {}
