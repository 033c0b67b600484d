"""The preparation step's acceptance tests (``arfuse.core.prepare``, the eager fast path) against its full checks,
on CPU: bitwise the same
outputs for every spec kind, with fresh, caller-provided and in-place outputs, across changes of token count,
dtype and spec on the same objects; the same error, word for word, for every bad input after a long run of good
calls (a caller's output aliasing an input included); a closed object refuses; exact counters after 10,000 calls;
the cached static-scale tensor never serves a stale value. The fast path is on by default; an object whose
preparation has ``fast = False`` runs the full checks only (what ``ARFUSE_FAST_PATH=0`` gives)."""
from __future__ import annotations

import gc
import itertools

import pytest
import torch

import arfuse
from arfuse.core import prepare
from arfuse.core.counters import Counters, process_stats
from arfuse.core.spec import FusionSpec, ScaleLayout, catalogue
from arfuse.verify import Case
from tests._calls import public_call, same_outputs as _same
from tests._ranks import Good, bad_inputs, closed_calls

HIDDEN, MAX = 64, 16
GROUPED = catalogue(group_size=16)  # every spec kind, groups that divide HIDDEN


def _pair(dtype, max_tokens=MAX, hidden=HIDDEN):
    fast_one = arfuse.AllReduceFusion(max_tokens=max_tokens, hidden_size=hidden, dtype=dtype, device="cpu")
    checked = arfuse.AllReduceFusion(max_tokens=max_tokens, hidden_size=hidden, dtype=dtype, device="cpu")
    checked._preparation.fast = False
    return fast_one, checked


@pytest.fixture
def counted(monkeypatch):
    """``counted(fusion)``: how many calls of ``fusion`` ran the full checks (a list holding the count)."""
    def watch(fusion):
        n = [0]
        real = fusion._preparation.check

        def checked(*args, **kwargs):
            n[0] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fusion._preparation, "check", checked)
        return n
    return watch


class Inputs:
    """One case's tensors, made the same way for both objects (each call gets its own copies)."""

    def __init__(self, spec: FusionSpec, tokens: int, dtype, seed: int, device="cpu"):
        self.spec, self.device = spec, device
        self.case = Case(tokens, HIDDEN, dtype, seed, weight_offset=1.0 if spec.weight_offset else 0.0)

    def call(self, fusion, mode: str, scale_tensor: bool = False):
        return public_call(fusion, self.spec, self.case, mode, self.device, scale_tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_and_checked_paths_agree_bitwise_for_every_spec_mode_and_size(dtype, counted):
    fast_one, checked = _pair(dtype)
    slow_calls = counted(fast_one)
    expected_slow = 0
    sizes = (3, MAX, 1, 7)
    for n, (spec, tokens) in enumerate(itertools.product(GROUPED, sizes)):  # sizes change call to call
        modes = ["fresh", "given"] + (["inplace"] if spec.residual else [])
        for mode in modes:
            inp = Inputs(spec, tokens, dtype, seed=n)
            _same(inp.call(fast_one, mode), inp.call(checked, mode), f"{spec.name} {mode} tokens={tokens}")
            # a caller's packed UE8M0 scale_out is checked by the checked path (its strides)
            expected_slow += mode == "given" and spec.scale_layout is ScaleLayout.UE8M0
        if spec.quant and spec.scale_layout is ScaleLayout.NONE:  # the static scale as a tensor, too
            inp = Inputs(spec, tokens, dtype, seed=n)
            _same(inp.call(fast_one, "fresh", True), inp.call(checked, "fresh", True), f"{spec.name} tensor scale")
    assert slow_calls[0] == expected_slow
    assert fast_one.stats() == checked.stats()
    fast_one.close()
    checked.close()


def test_dtype_and_object_changes_between_calls_keep_every_result():
    objects = {dt: _pair(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    for n in range(30):  # interleaved objects, dtypes, specs and sizes
        dtype = (torch.float32, torch.float16, torch.bfloat16)[n % 3]
        spec = GROUPED[(7 * n) % len(GROUPED)]
        inp = Inputs(spec, 1 + (5 * n) % MAX, dtype, seed=100 + n)
        a, b = objects[dtype]
        _same(inp.call(a, "fresh"), inp.call(b, "fresh"), f"call {n} {spec.name} {dtype}")
    for a, b in objects.values():
        a.close()
        b.close()


def _error(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    return None


def _good_calls(fusion, good: Good, n: int) -> None:
    out = torch.empty_like(good.x)
    for _ in range(n):
        fusion.residual_rmsnorm(good.x, good.residual, good.weight)
        fusion.residual_rmsnorm(good.x, good.residual, good.weight, norm_out=out)
        fusion.rmsnorm(good.x, good.weight)
        fusion.all_reduce(good.x)
        fusion.residual_rmsnorm_fp8(good.x, good.residual, good.weight, 0.5)
        fusion.residual_rmsnorm_quant(good.x, good.residual, good.weight, quant=arfuse.FP8PerTokenGroup(8))
        good.moe(fusion)


def test_bad_inputs_after_a_long_run_of_good_calls_raise_the_checked_paths_error():
    fast_one, checked = _pair(torch.float32, Good.MAX, Good.H)
    good = Good()
    for bad in bad_inputs():
        _good_calls(fast_one, good, 20)
        got = _error(lambda: bad.call(fast_one, good))
        want = _error(lambda: bad.call(checked, good))
        assert want is not None and got == want, (bad.label, got, want)
        assert all(w in want[1] for w in bad.words), (bad.label, want)
    fast_one.close()
    checked.close()


def test_a_caller_output_that_comes_to_alias_an_input_still_raises():
    fusion, _ = _pair(torch.float32)
    x, residual, weight = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN), torch.ones(HIDDEN)
    norm_out, res_out = torch.empty(4, HIDDEN), torch.empty(4, HIDDEN)
    for _ in range(100):
        fusion.residual_rmsnorm(x, residual, weight, norm_out=norm_out, residual_out=res_out)
    big = torch.randn(8, HIDDEN)
    cases = [
        (dict(norm_out=x), "norm_out must not share memory with x"),
        (dict(residual_out=residual), "residual_out must not share memory with residual"),
        (dict(norm_out=norm_out, residual_out=norm_out), "norm_out and residual_out must not share memory"),
        (dict(norm_out=weight.expand(4, HIDDEN).contiguous(), residual_out=big[1:5]), None),  # disjoint: runs
        (dict(norm_out=big[:4], residual_out=big[3:7]), "must not share memory"),  # one row in common
    ]
    for kwargs, message in cases:
        if message is None:
            fusion.residual_rmsnorm(x, residual, weight, **kwargs)
            continue
        with pytest.raises(ValueError, match=message):
            fusion.residual_rmsnorm(x, residual, weight, **kwargs)
    with pytest.raises(ValueError, match="residual_out must not share memory with x"):
        fusion.residual_rmsnorm(x, x, weight, inplace=True)  # in place, the residual is x itself
    rows = torch.randn(8, HIDDEN)
    with pytest.raises(ValueError, match="residual_out must not share memory with x"):
        fusion.residual_rmsnorm(rows[:4], rows[2:6], weight, inplace=True)
    fusion.close()


def test_a_closed_object_refuses_every_op_after_fast_calls():
    fusion, _ = _pair(torch.float32, Good.MAX, Good.H)
    good = Good()
    _good_calls(fusion, good, 3)
    fusion.close()
    for bad in closed_calls():
        with pytest.raises(bad.error) as info:
            bad.call(fusion, good)
        assert all(w in str(info.value) for w in bad.words), (bad.label, str(info.value))


def test_counters_are_exact_after_ten_thousand_calls():
    fusion = arfuse.AllReduceFusion(max_tokens=4, hidden_size=16, dtype=torch.float32, device="cpu")
    x, residual, weight = torch.randn(2, 16), torch.randn(2, 16), torch.ones(16)
    idx, scales = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.rand(2, 2)
    out = torch.empty(2, 16)
    calls = [lambda: fusion.residual_rmsnorm(x, residual, weight),
             lambda: fusion.residual_rmsnorm(x, residual.clone(), weight, inplace=True),
             lambda: fusion.residual_rmsnorm(x, residual, weight, norm_out=out),
             lambda: fusion.rmsnorm(x, weight), lambda: fusion.all_reduce(x),
             lambda: fusion.residual_rmsnorm_fp8(x, residual, weight, 0.25),
             lambda: fusion.residual_rmsnorm_quant(x, residual, weight, quant=arfuse.FP8PerToken()),
             lambda: fusion.moe_finalize_residual_rmsnorm(torch.randn(4, 16), idx, scales, residual, weight)]
    before = process_stats()["calls"].get("torch_ref", 0)
    with torch.inference_mode():
        for i in range(10_000):
            calls[i % len(calls)]()
            if i % 1000 == 0:  # a refused call is not counted
                with pytest.raises(ValueError):
                    fusion.all_reduce(torch.randn(5, 16))
    assert fusion.stats() == {"calls": {"torch_ref": 10_000}, "fallbacks": {}, "errors": {}}
    assert process_stats()["calls"]["torch_ref"] == before + 10_000
    fusion.reset_stats()
    for _ in range(5):
        fusion.all_reduce(x)
    assert fusion.stats()["calls"] == {"torch_ref": 5}
    assert process_stats()["calls"]["torch_ref"] == before + 10_005
    fusion.close()
    fusion = calls = None  # the object is collected
    gc.collect()
    assert process_stats()["calls"]["torch_ref"] == before + 10_005  # a collected object's counts are kept


def test_counter_slots_count_alongside_named_calls():
    base = process_stats()["calls"].get("test/slot", 0)
    c = Counters()
    i = c.slot("test/slot")
    assert c.slot("test/slot") == i and c.slot("test/other") != i
    c.slot_counts[i] += 3
    c.count_call("test/slot")
    assert c.calls == {"test/slot": 4} and c.snapshot()["calls"] == {"test/slot": 4}
    assert process_stats()["calls"]["test/slot"] == base + 4
    counts = c.slot_counts
    c.reset()
    assert c.slot_counts is counts and c.calls == {} and process_stats()["calls"]["test/slot"] == base + 4
    c.slot_counts[i] += 1
    del c, counts
    gc.collect()
    assert process_stats()["calls"]["test/slot"] == base + 5


def test_a_cached_static_scale_never_serves_a_stale_value():
    fusion, checked = _pair(torch.float32)
    inp = Inputs(FusionSpec(quant=arfuse.FP8Static(0.5).spec_fields()["quant"]), 4, torch.float32, seed=3)
    x, residual, weight = inp.case.x(0), inp.case.residual(), inp.case.weight()
    first = fusion.residual_rmsnorm_quant(x, residual, weight, quant=arfuse.FP8Static(0.5))
    second = fusion.residual_rmsnorm_quant(x, residual, weight, quant=arfuse.FP8Static(0.5))
    assert second.scale is first.scale and float(first.scale) == 0.5  # one tensor per value
    first.scale.fill_(2.0)  # the caller writes into the returned scale
    third = fusion.residual_rmsnorm_quant(x, residual, weight, quant=arfuse.FP8Static(0.5))
    want = checked.residual_rmsnorm_quant(x, residual, weight, quant=arfuse.FP8Static(0.5))
    assert third.scale is not first.scale and float(third.scale) == 0.5
    assert torch.equal(third.quant.view(torch.uint8), want.quant.view(torch.uint8))
    with torch.inference_mode():
        fourth = fusion.residual_rmsnorm_quant(x, residual, weight, quant=arfuse.FP8Static(0.5))
    assert fourth.scale is third.scale  # cached outside inference mode, usable inside it
    for k in range(2 * prepare.MAX_SCALES):
        fusion.residual_rmsnorm_fp8(x, residual, weight, 0.01 * (k + 1))
    assert len(fusion._preparation.scales) <= prepare.MAX_SCALES
    fusion.close()
    checked.close()


class _Sub(torch.Tensor):
    """A tensor subclass: the fast path leaves it to the checked path (and the op dispatch)."""


def test_exotic_argument_types_take_the_checked_path_and_still_run(counted):
    fusion, checked = _pair(torch.float32)
    slow = counted(fusion)
    x, residual = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    weight = torch.nn.Parameter(torch.ones(HIDDEN), requires_grad=False)
    want = checked.residual_rmsnorm(x, residual, weight, 1e-6)
    for args, kwargs in [((x, residual, weight, 1e-6), {}),  # a Parameter weight: fast
                         ((x, residual, weight, 1e-6), {"weight_offset": 0}),  # an int offset: checked
                         ((x, residual, weight), {"eps": torch.tensor(1e-6).item()}),
                         ((x.as_subclass(_Sub), residual, weight, 1e-6), {})]:
        got = fusion.residual_rmsnorm(*args, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert slow[0] == 2  # the int offset and the subclass
    fusion.close()
    checked.close()


def test_each_spec_s_acceptance_function_is_generated_from_its_operand_table():
    from arfuse.core import accept, operands
    from arfuse.core.types import Capacity

    cap = Capacity(MAX, HIDDEN, torch.bfloat16, torch.device("cpu"))
    for spec in GROUPED:
        text = accept.source(spec, cap)
        for o in operands.operands(spec):
            assert f"call.{o.slot}" in text or o.slot in ("expert_idx", "expert_scales", "scale"), (spec.name, o)
        for slot in operands.OUTPUT_SLOTS:  # written or refused, never ignored
            assert f"call.{slot}" in text, (spec.name, slot)
        assert callable(accept.compile_accept(spec, cap, dict(moe_tokens=None, static_scale=None,
                                                              may_overlap=None)))


@pytest.mark.parametrize("fast", [True, False], ids=["accept", "full"])
def test_run_refuses_what_its_spec_does_not_take_and_leaves_the_call_as_it_was(fast):
    from arfuse.core.types import FusedCall

    fusion = arfuse.AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu")
    fusion._preparation.fast = fast
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.rand(16)
    plain, offset, norm_only = FusionSpec(), FusionSpec(weight_offset=True), FusionSpec(residual=False)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="weight_offset must be finite"):
            fusion.run(offset, FusedCall(x, None, residual=r, weight=w, weight_offset=bad))
    with pytest.raises(ValueError, match=r"weight_offset is 1.0, but .* has no weight offset"):
        fusion.run(plain, FusedCall(x, None, residual=r, weight=w, weight_offset=1.0))
    call = FusedCall(x, None, residual=r, weight=w, eps=1e-5)
    with pytest.raises(ValueError, match=r"residual is not an input of this call \(rmsnorm"):
        fusion.run(norm_only, call)
    # refused: nothing allocated, nothing normalised
    assert call.out is None and call.residual_out is None and call.eps == 1e-5 and call.num_tokens == 4
    with pytest.raises(ValueError, match="scale is not an input"):
        fusion.run(plain, FusedCall(x, None, residual=r, weight=w, scale=torch.ones(1)))
    done = fusion.run(offset, FusedCall(x, None, residual=r, weight=w, weight_offset=1.0))
    assert done.out is not None and done.residual_out is not None
    fusion.close()


def test_moe_rows_missing_are_refused_where_the_index_is_not_read():
    # on CUDA the acceptance test does not read the routing (the kernels guard it); no expert rows at all is
    # still the full check's error
    from arfuse.core.types import FusedCall

    fusion = arfuse.AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu")
    prep = fusion._preparation
    prep.cuda = True
    moe = FusionSpec(prologue=arfuse.core.spec.Prologue.MOE_FINALIZE)
    call = FusedCall(torch.empty(0, 16), None, residual=torch.randn(2, 16), weight=torch.rand(16),
                     expert_idx=torch.zeros(2, 2, dtype=torch.int32), expert_scales=torch.ones(2, 2))
    assert prep.accept(moe, call, False) is False and call.out is None
    with pytest.raises(ValueError, match="expert_out has no rows"):
        prep.check("moe_finalize_residual_rmsnorm", moe, call, False)
    fusion.close()
