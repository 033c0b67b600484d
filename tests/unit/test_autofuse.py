"""``arfuse.compile`` without ranks: argument checks, the Inductor options it builds, the pattern table, the
checks a match must pass, the replacement ops (one gloo rank), and a model without collectives (nothing changes,
the report says so)."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import arfuse
from arfuse import fusions
from arfuse.autofuse import checks, compiler, graph_pass, ops, patterns, tracing
from arfuse.autofuse.replace import REPLACEMENTS
from arfuse.core.spec import ALLREDUCE, FusionSpec, Quant
from arfuse.core.types import FP8_DTYPE
from tests._ranks import launch


def _fn(x):
    return x + 1


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(max_tokens=0), ValueError, ("max_tokens", "> 0")),
    (dict(max_tokens=True), TypeError, ("max_tokens", "int")),
    (dict(max_tokens=2.5), TypeError, ("max_tokens", "int")),
    (dict(backend="eager"), ValueError, ("backend", "inductor")),
    (dict(mode=3), TypeError, ("mode",)),
    (dict(mode="fastest"), ValueError, ("mode", "fastest")),
    (dict(options=[("a", 1)]), TypeError, ("options", "dict")),
])
def test_bad_arguments_raise_naming_them(kwargs, error, words):
    with pytest.raises(error) as e:
        arfuse.compile(_fn, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_model_or_fn_must_be_callable():
    with pytest.raises(TypeError, match="model_or_fn"):
        arfuse.compile(42)


def test_decorator_forms_return_compiled_callables():
    assert callable(arfuse.compile(max_tokens=16)(_fn))
    assert isinstance(arfuse.compile(nn.Linear(2, 2)), torch._dynamo.eval_frame.OptimizedModule)


def test_options_spell_out_the_mode_and_keep_the_callers():
    fp = graph_pass.FusionPass(64, "f")
    opts = compiler.inductor_options("reduce-overhead", None, None, fp)
    assert opts["triton.cudagraphs"] is True and opts["post_grad_custom_post_pass"] is fp
    assert opts["fx_graph_cache"] is False  # a cached graph would skip the pass and the report
    mine = compiler.inductor_options(None, None, {"fx_graph_cache": True, "max_autotune": True}, fp)
    assert mine["fx_graph_cache"] is True and mine["max_autotune"] is True


def test_callers_post_grad_pass_runs_first_then_arfuse():
    seen = []

    class Theirs(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append("theirs")

        def uuid(self):
            return "theirs-v1"

    fp = graph_pass.FusionPass(64, "f")
    chained = compiler.inductor_options(None, None, {"post_grad_custom_post_pass": Theirs()}, fp)
    chained = chained["post_grad_custom_post_pass"]
    assert isinstance(chained, graph_pass.ChainedPass) and chained.second is fp
    assert chained.uuid() == f"theirs-v1+{fp.uuid()}"
    assert graph_pass.ChainedPass(lambda g: None, fp).uuid() is None  # an opaque callable: no caching
    both = graph_pass.ChainedPass([Theirs(), Theirs()], fp)
    assert both.uuid() == f"theirs-v1+theirs-v1+{fp.uuid()}"
    seen.clear()
    both(torch.fx.Graph())
    assert seen == ["theirs", "theirs"]


def test_uuid_is_stable_and_covers_capacity_and_sources():
    a, b = graph_pass.FusionPass(64, "a"), graph_pass.FusionPass(64, "b")
    assert a.uuid() == b.uuid()  # the label only names the report entry
    assert graph_pass.FusionPass(128, "a").uuid() != a.uuid()
    assert graph_pass.source_hash() in a.uuid() and len(graph_pass.source_hash()) == 64


def test_pattern_table_is_consistent():
    entries = patterns.entries()
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    assert {e.op for e in entries} <= set(REPLACEMENTS)
    assert hasattr(torch.ops.arfuse, "autofused")  # one op for every replacement
    # every (form, norm, residual, epilogue) combination the table claims
    for casts in (True, False):
        for res in patterns.RESIDUALS:
            for norm in patterns.NORMS:
                if not casts and (not norm.default_weight or norm.weight_offset):
                    continue
                assert any(e.casts == casts and e.norm == norm and e.residual == res and e.epilogue is None
                           for e in entries)
    first_plain = next(i for i, e in enumerate(entries) if e.epilogue is None)
    assert all(e.epilogue is not None for e in entries[:first_plain])  # FP8 entries are tried first
    assert entries[-1] is patterns.PLAIN_ALL_REDUCE and entries[-1].device_types == ("cuda",)


def test_every_spelling_traces_into_a_pattern_on_this_torch():
    assert patterns.unbuilt() == []
    built = [e for e, _ in patterns.compiled_entries()]
    assert built[-1] is patterns.PLAIN_ALL_REDUCE
    # only exact duplicates are dropped: in fp32 a float FP8 scale traces like a tensor one (no casts to place)
    dropped = [e for e in patterns.entries() if e not in built]
    assert all(not e.casts and e.epilogue is not None and e.epilogue.float_scale for e in dropped), dropped
    assert any(e.casts and e.epilogue is not None and e.epilogue.float_scale for e in built)


def _traced_norm(norm: patterns.Norm, dtype) -> torch.fx.GraphModule:
    return tracing.trace(norm.function(), (((4, 8), dtype), ((8,), dtype)))


def test_traced_norms_hold_this_torchs_decomposition():
    ops_of = {}
    for norm in (patterns.Norm("hf_rmsnorm", "after_cast", True), patterns.Norm("torch_rms_norm")):
        gm = _traced_norm(norm, torch.bfloat16)
        ops_of[norm.family] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # the eps add is whatever the decomposition emits (add.Tensor for HF's `var + eps`, add.Scalar for
    # F.rms_norm's today): the pattern holds the traced op, not a hand-picked one
    assert torch.ops.aten.rsqrt.default in ops_of["hf_rmsnorm"]
    assert ops_of["hf_rmsnorm"].count(patterns.CONVERT) == 2 and ops_of["torch_rms_norm"].count(patterns.CONVERT) == 2
    assert all(not str(t).endswith("_") and "add_" not in str(t) for t in ops_of["torch_rms_norm"])  # functional


def test_trace_sentinels_become_keyword_arguments():
    from torch._inductor.pattern_matcher import KeywordArg

    gm = _traced_norm(patterns.Norm("offset_rmsnorm", "before_cast", False), torch.bfloat16)
    pattern = tracing.to_pattern(gm, [KeywordArg("h"), KeywordArg("weight")], torch.bfloat16, 1,
                                 ("eps", "dims", "weight_offset"))
    text = repr(pattern)
    for name in ("eps", "dims", "weight_offset", "up_dtype", "out_dtype"):
        assert f"KeywordArg('{name}')" in text, text
    with pytest.raises(tracing.TraceError, match="lost multiplier"):
        tracing.to_pattern(gm, [KeywordArg("h"), KeywordArg("weight")], torch.bfloat16, 1, ("multiplier",))


# -- checks on a match's open values --------------------------------------------------------------------------

def _node(t):
    return types.SimpleNamespace(meta={"val": t})


def _kw(dtype=torch.float32, **over):
    x = torch.empty(4, 8, 16, dtype=dtype)
    kw = dict(x=_node(x), group="0", residual=_node(torch.empty_like(x)), weight=_node(torch.empty(16, dtype=dtype)),
              eps=1e-6, dims=[-1], up_dtype=torch.float32, out_dtype=dtype, multiplier=0.5, scale=0.25,
              qmin=-448, qmax=448, q_dtype=FP8_DTYPE, sum_views=(), norm_views=())
    kw.update(over)
    return kw


def _entry(casts=False, residual="residual+sum", fp8=False):
    return next(e for e in patterns.entries() if e.casts == casts and e.residual is not None
                and e.residual.name == residual and (e.epilogue is not None) == fp8)


def _offset_entry():
    return next(e for e in patterns.entries() if e.norm is not None and e.norm.weight_offset and e.epilogue is None
                and e.residual.name == "residual+sum")


@pytest.mark.parametrize("entry, kw, words", [
    (_entry(), _kw(), None),
    (_entry(casts=True), _kw(torch.bfloat16), None),
    (_entry(fp8=True), _kw(), None),
    (_entry(residual="residual+sum*m"), _kw(), None),
    (_entry(), _kw(torch.bfloat16), "without an fp32 upcast"),
    (_entry(), _kw(dims=[0]), "reduces dims [0]"),
    (_entry(), _kw(eps=0.0), "eps"),
    (_entry(), _kw(eps=1e-60), "eps"),
    (_entry(), _kw(weight=_node(torch.empty(16, dtype=torch.bfloat16))), "weight is bfloat16"),
    (_entry(), _kw(weight=_node(torch.empty(8))), "weight of shape (8,)"),
    (_entry(), _kw(residual=_node(torch.empty(16))), "broadcasts"),
    (_entry(), _kw(x=_node(torch.empty(4, 16, dtype=torch.int64))), "dtype int64"),
    (_entry(casts=True), _kw(torch.bfloat16, out_dtype=torch.float32), "casts to"),
    (_entry(residual="residual+sum*m"), _kw(multiplier=float("inf")), "scaled by"),
    (_entry(fp8=True), _kw(qmax=240), "clamps to"),
    (_entry(fp8=True), _kw(scale=_node(torch.empty(2))), "one-element float32"),
    (_entry(fp8=True), _kw(q_dtype=torch.float8_e5m2), "quantizes to"),
    (patterns.PLAIN_ALL_REDUCE, _kw(), "no arfuse fast path on cpu"),
    (_offset_entry(), _kw(torch.bfloat16, weight_offset=1.0), None),
    (_offset_entry(), _kw(torch.bfloat16, weight_offset=_node(torch.empty(()))), "offset by"),
    (_entry(casts=True), _kw(torch.bfloat16, up_dtype=torch.float64), "casts to"),
    # row views between the allreduce and the add / the add and the norm
    (_entry(), _kw(x=_node(torch.empty(32, 16)), sum_views=(_node(torch.empty(4, 8, 16)),)), None),
    (_entry(), _kw(norm_views=(_node(torch.empty(32, 16)),), dims=[1]), None),
    (_entry(), _kw(x=_node(torch.empty(32, 16)), sum_views=(_node(torch.empty(4, 8, 2, 8)),)), "hidden dim 16"),
    (_entry(), _kw(norm_views=(_node(torch.empty(4, 128)),)), "hidden dim 16"),
    (_entry(), _kw(x=_node(torch.empty(32, 16)), sum_views=(_node(torch.empty(8, 4, 16)),)), "broadcasts"),
    (_entry(), _kw(norm_views=(_node(torch.empty(32, 16)),), dims=[2]), "reduces dims [2]"),
    # a term added to the sum before the residual add (a shared expert's output)
    (_entry(residual="residual+(sum+addend)"), _kw(addend=_node(torch.empty(4, 8, 16))), None),
    (_entry(residual="residual+(sum+addend)"), _kw(x=_node(torch.empty(32, 16)), addend=_node(torch.empty(32, 16)),
                                                   addend_views=(_node(torch.empty(4, 8, 16)),)), None),
    (_entry(residual="residual+(sum+addend)"), _kw(addend=_node(torch.empty(16))), "the term added to the sum"),
    (_entry(residual="residual+(sum+addend)"), _kw(addend=_node(torch.empty(4, 8, 16, dtype=torch.float64))),
     "the term added to the sum"),
])
def test_checks_name_what_would_change_results(entry, kw, words):
    reason = checks.why_not(entry, kw)
    if words is None:
        assert reason is None
    else:
        assert reason is not None and words in reason, reason


# -- the replacement ops, on one gloo rank ---------------------------------------------------------------------

def _ops_rank(rank, world):
    from torch.distributed.distributed_c10d import _get_default_group

    group = _get_default_group().group_name
    x, r, w = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.rand(16) + 0.5
    s = x + r
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    out = {}
    op = torch.ops.arfuse.autofused.default
    rr, r8 = FusionSpec(), FusionSpec(quant=Quant.FP8_STATIC)
    rn, rn_offset, ar = FusionSpec(residual=False), FusionSpec(residual=False, weight_offset=True), ALLREDUCE

    def args(spec, x, residual=None, weight=None, scale=None, eps=1e-6, eps_t=None, offset=0.0, max_tokens=8):
        return (x, residual, weight, scale, None, None, None, eps, offset, eps_t, spec.code, group, max_tokens)

    norm, res = op(*args(rr, x, r, w))
    out["residual_rmsnorm"] = ((norm - ref).abs().max().item(), (res - s).abs().max().item(), tuple(norm.shape))
    norm, res = op(*args(rr, x, r, w, eps=1.0, eps_t=torch.tensor(1e-6), max_tokens=4))
    out["over_capacity"] = ((norm - ref).abs().max().item(), (res - s).abs().max().item())
    out["stats"] = arfuse.stats()
    out["objects"] = len(fusions.cached())
    q, _ = op(*args(r8, x, r, w, torch.tensor([0.5])))
    out["fp8"] = (q.dtype, (q.float() - (ref / 0.5).clamp(-448, 448).to(FP8_DTYPE).float()).abs().max().item())
    rms, = op(*args(rn, x, weight=w))
    out["rmsnorm"] = (rms - x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w).abs().max().item()
    offset_norm, _ = op(*args(FusionSpec(weight_offset=True), x, r, w - 1.0, offset=1.0))
    out["weight_offset"] = (offset_norm - ref).abs().max().item()
    out["all_reduce"] = torch.equal(op(*args(ar, x, eps=1.0))[0], x)
    transposed = x.transpose(0, 1).contiguous().transpose(0, 1)
    results = {}
    for name, call in (("residual_rmsnorm", args(rr, x, r, w)), ("rmsnorm", args(rn_offset, x, weight=w, offset=1.0)),
                       ("all_reduce", args(ar, x, eps=1.0)),
                       # a transposed input: the fake must promise the real op's contiguous outputs
                       ("residual_rmsnorm transposed x", args(rr, transposed, r, w)),
                       ("all_reduce transposed x", args(ar, transposed, eps=1.0))):
        results[name] = sorted(set(torch.library.opcheck(op, call).values()))
    out["opcheck"] = results
    ops.close_all()
    out["objects_after_close"] = len(fusions.cached())
    return out


@pytest.fixture(scope="module")
def one_rank():
    return launch(_ops_rank, 1)[0]


def test_ops_compute_arfuses_math_on_any_shape(one_rank):
    norm_err, res_err, shape = one_rank["residual_rmsnorm"]
    assert norm_err < 1e-5 and res_err == 0.0 and shape == (2, 3, 16)
    assert one_rank["rmsnorm"] < 1e-5 and one_rank["all_reduce"] and one_rank["weight_offset"] < 1e-5
    dtype, fp8_err = one_rank["fp8"]
    assert dtype == FP8_DTYPE and fp8_err <= 0.5  # at most one e4m3 step near 4


def test_ops_beyond_capacity_run_unfused_counted_once_per_call(one_rank):
    norm_err, res_err = one_rank["over_capacity"]
    assert norm_err < 1e-5 and res_err == 0.0
    stats = one_rank["stats"]
    assert stats["calls"][ops.UNFUSED_PATH] == 1
    assert stats["fallbacks"] == {"residual_rmsnorm: 6 tokens > max_tokens 4 of arfuse.compile: ran unfused": 1}
    assert one_rank["objects"] == 2  # one fusion object per capacity
    assert one_rank["objects_after_close"] == 0


def test_ops_pass_opcheck(one_rank):
    for name, outcomes in one_rank["opcheck"].items():
        assert outcomes == ["SUCCESS"], (name, outcomes)


# -- no collectives ------------------------------------------------------------------------------------------

class NoTP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.norm = nn.Linear(16, 16), nn.RMSNorm(16, eps=1e-6)

    def forward(self, x, residual):
        h = residual + self.up(x)
        return self.norm(h), h


def test_model_without_collectives_is_unchanged_and_reported():
    model = NoTP().requires_grad_(False)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    before = arfuse.stats()
    with torch.no_grad():
        expected = model(x, r)
        got = arfuse.compile(model, fullgraph=True)(x, r)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(got, expected))
    assert arfuse.stats() == before
    graphs = arfuse.compile_report("NoTP")["graphs"]
    assert graphs and graphs[-1]["collectives"] == [] and graphs[-1]["note"] == "no collectives: nothing to fuse"
    assert "no collectives: nothing to fuse" in str(arfuse.compile_report("NoTP"))
    assert torch._inductor.config.post_grad_custom_post_pass is None


def test_hf_moe_model_at_world_size_1_compiles_runs_and_reports_nothing_to_fuse():
    pytest.importorskip("transformers")
    from tests._autofuse_models import moe_at_world_size_1

    r = moe_at_world_size_1("qwen3_moe", "cpu", torch.float32)
    assert r["err"] <= 1e-5 and r["stats_unchanged"]
    assert r["graphs"] and all(g["collectives"] == [] and g["note"] == "no collectives: nothing to fuse"
                               for g in r["graphs"]), r["report"]
    assert "no collectives: nothing to fuse" in r["report"]
