"""``arfuse.compile`` on every RMSNorm spelling and residual form it claims, on 2 gloo ranks.

One compiled graph per dtype holds one block per (spelling, residual form): ``funcol.all_reduce`` then the
residual add (either order, optionally with the allreduced branch scaled by a constant) or none, then HF's
``LlamaRMSNorm`` math (weight multiply after or before the downcast, either operand order), ``F.rms_norm`` or
``nn.RMSNorm``, Gemma's ``1 + weight``, with differing eps; plus static FP8 quantization (tensor and float scale). Each block must be
matched exactly once, by the expected pattern, and give the uncompiled function's results. Also: a graph with
autograd recording (nothing fused, correct, the reason reported), an in-place ``dist.all_reduce`` of a graph input
(the copy back into the input kept), the caller's own post-grad pass chained, and no global Inductor config left
changed (a plain ``torch.compile`` afterwards fuses nothing).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import arfuse
from arfuse.core.types import FP8_DTYPE
from arfuse.models.generate import rel_err
from tests._ranks import launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # one launch compiles six graphs
TOKENS, HIDDEN = 6, 32
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
FP8_TOL = 3e-2  # one e4m3 step where the fused fp32 norm and the graph's rounded norm straddle a boundary


def hf_rmsnorm(h, w, eps, *, weight_after_cast=True, weight_first=True):
    """HF ``LlamaRMSNorm.forward`` (and its variants: weight applied before the downcast, operands swapped)."""
    dtype = h.dtype
    h32 = h.to(torch.float32)
    var = h32.pow(2).mean(-1, keepdim=True)
    h32 = h32 * torch.rsqrt(var + eps)
    if weight_after_cast:
        y = h32.to(dtype)
        return w * y if weight_first else y * w
    return (w * h32 if weight_first else h32 * w).to(dtype)


def offset_rmsnorm(h, w, eps):
    """Gemma's ``RMSNorm``: fp32 math, weight applied as ``1 + weight`` in fp32, then the downcast."""
    h32 = h.float()
    out = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.float())).type_as(h)


def torch_rms_norm(h, w, eps):
    return F.rms_norm(h, (h.shape[-1],), w, eps)


class ModuleNorm:
    """``nn.RMSNorm`` with the block's weight."""

    def __init__(self):
        self.modules = {}

    def __call__(self, h, w, eps):
        key = (eps, w.dtype)
        if key not in self.modules:
            m = nn.RMSNorm(w.shape[0], eps=eps, dtype=w.dtype)
            with torch.no_grad():
                m.weight.copy_(w)
            self.modules[key] = m.requires_grad_(False)
        return self.modules[key](h)


# spelling -> (norm function, expected pattern prefix per dtype form)
SPELLINGS = {
    "hf": (hf_rmsnorm, {"fp32": "fp32/hf_rmsnorm/weight_first", "lowp": "lowp/hf_rmsnorm/weight_first"}),
    "hf weight last": (functools.partial(hf_rmsnorm, weight_first=False),
                       {"fp32": "fp32/hf_rmsnorm/weight_last", "lowp": "lowp/hf_rmsnorm/weight_last"}),
    "hf weight before cast": (functools.partial(hf_rmsnorm, weight_after_cast=False),
                              {"fp32": "fp32/hf_rmsnorm/weight_first",
                               "lowp": "lowp/hf_rmsnorm/weight_before_cast/weight_first"}),
    "hf weight before cast last": (functools.partial(hf_rmsnorm, weight_after_cast=False, weight_first=False),
                                   {"fp32": "fp32/hf_rmsnorm/weight_last",
                                    "lowp": "lowp/hf_rmsnorm/weight_before_cast/weight_last"}),
    "gemma (1 + weight)": (offset_rmsnorm, {"fp32": "fp32/hf_rmsnorm/weight_last",  # offset: just a weight
                                            "lowp": "lowp/offset_rmsnorm/weight_last"}),
    "F.rms_norm": (torch_rms_norm, {"fp32": "fp32/torch_rms_norm/", "lowp": "lowp/torch_rms_norm/"}),
    "nn.RMSNorm": (ModuleNorm(), {"fp32": "fp32/torch_rms_norm/", "lowp": "lowp/torch_rms_norm/"}),
}
MULTIPLIER = 0.3
RESIDUALS = {
    "no_residual": None,
    "residual+sum": lambda r, y: r + y,
    "sum+residual": lambda r, y: y + r,
    "residual+sum*m": lambda r, y: r + y * MULTIPLIER,
    "sum*m+residual": lambda r, y: y * MULTIPLIER + r,
}
EPS = (1e-6, 1e-5, 3e-3)
BLOCKS = [(s, r, EPS[i % len(EPS)]) for i, (s, r) in enumerate((s, r) for s in SPELLINGS for r in RESIDUALS)]
FP8_BLOCKS = ("tensor scale", "float scale")


def _fp8(y, scale):
    return (y / scale).clamp(-448, 448).to(FP8_DTYPE)


def many_blocks(xs, rs, w, scale_t):
    """Every block of BLOCKS then FP8_BLOCKS, each on its own input: outputs in order."""
    outs = []
    for (spelling, residual, eps), x, r in zip(BLOCKS, xs, rs):
        norm = SPELLINGS[spelling][0]
        y = funcol.all_reduce(x, "sum", dist.group.WORLD)
        add = RESIDUALS[residual]
        if add is None:
            outs.append(norm(y, w, eps))
        else:
            s = add(r, y)
            outs += [norm(s, w, eps), s]
    for name, x, r in zip(FP8_BLOCKS, xs[len(BLOCKS):], rs[len(BLOCKS):]):
        s = r + funcol.all_reduce(x, "sum", dist.group.WORLD)
        outs += [_fp8(hf_rmsnorm(s, w, 1e-6), scale_t if name == "tensor scale" else 0.5), s]
    return outs


def _rows3(t):
    return t.view(2, -1, t.shape[-1])


def _ar(t):
    return funcol.all_reduce(t, "sum", dist.group.WORLD)


# name -> (block, expected op or None when left alone, words its report entry must hold)
VIEW_BLOCKS = {
    # MoE experts: the sum of (tokens, hidden) rows viewed back to (batch, seq, hidden) before the residual add
    "sum viewed up, then the add": (lambda x, r, w: _pair(hf_rmsnorm, _rows3(r) + _rows3(_ar(x)), w),
                                    "residual_rmsnorm", "/hf_rmsnorm/weight_first/residual+sum"),
    "sum flattened, then the add": (lambda x, r, w: _pair(torch_rms_norm, r + _ar(_rows3(x)).reshape(-1, HIDDEN), w),
                                    "residual_rmsnorm", "/torch_rms_norm/residual+sum"),
    "add, then flattened for the norm": (lambda x, r, w: _flat_norm(_rows3(r) + _ar(_rows3(x)), w),
                                         "residual_rmsnorm", "/hf_rmsnorm/weight_last/residual+sum"),
    "unsqueezed, squeezed for the norm": (lambda x, r, w: _squeezed(r.unsqueeze(0) + _ar(x).unsqueeze(0), w),
                                          "residual_rmsnorm", "/hf_rmsnorm/weight_first/residual+sum"),
    # Qwen2-MoE: a replicated shared expert's output added to the experts' sum, then viewed, then the residual add
    "shared term added, viewed, then the add": (lambda x, r, w: _pair(hf_rmsnorm, _rows3(r) + _rows3(_ar(x) + x.tanh()),
                                                                      w),
                                                "residual_rmsnorm", "/hf_rmsnorm/weight_first/residual+(sum+addend)"),
    "no residual, flattened": (lambda x, r, w: (hf_rmsnorm(_ar(_rows3(x)).reshape(-1, HIDDEN), w, 1e-6),),
                               "rmsnorm", "/hf_rmsnorm/weight_first/no_residual"),
    "transposed before the add": (lambda x, r, w: _pair(hf_rmsnorm, r.view(-1, 2, HIDDEN) + _ar(_rows3(x)).transpose(0, 1),
                                                        w), None, "reorders or mixes rows"),
    "hidden split before the add": (lambda x, r, w: _pair(hf_rmsnorm, r.view(-1, 2, HIDDEN // 2)
                                                          + _ar(x).view(-1, 2, HIDDEN // 2), w[:HIDDEN // 2]),
                                    None, f"changes the hidden dim {HIDDEN}"),
    "layer norm after the add": (lambda x, r, w: _pair(lambda h, w, eps: F.layer_norm(h, (HIDDEN,), w, None, eps),
                                                       r + _ar(x), w), None, "LayerNorm, not an RMSNorm"),
}
# GLM-4-MoE, DeepSeek-V3: the shared expert is sharded too, so two allreduced sums meet before the residual add (two
# collectives: one fuses with the other's sum as its addend, the other stays a plain all_reduce); last in the graph
TWO_SUMS = "two allreduces summed, then the add"
TWO_SUMS_BLOCK = lambda x, r, w: _pair(hf_rmsnorm, r + (_rows3(_ar(x)).reshape(-1, HIDDEN) + _ar(x * 0.5)), w)  # noqa: E731


def _pair(norm, s, w):
    return norm(s, w, 1e-6), s


def _flat_norm(s, w):
    return hf_rmsnorm(s.reshape(-1, HIDDEN), w, 1e-6, weight_first=False), s


def _squeezed(s, w):
    return hf_rmsnorm(s.squeeze(0), w, 1e-6), s


def view_blocks(xs, rs, w):
    """Every block of VIEW_BLOCKS, each on its own input: outputs in order."""
    outs = []
    blocks = [block for block, _, _ in VIEW_BLOCKS.values()] + [TWO_SUMS_BLOCK]
    for block, x, r in zip(blocks, xs, rs):
        outs += list(block(x, r, w))
    return outs


def residual_block(x, r, w):
    s = r + funcol.all_reduce(x, "sum", dist.group.WORLD)
    return hf_rmsnorm(s, w, 1e-6), s


def inplace_block(x, r, w):
    dist.all_reduce(x)  # x is a graph input: the compiled graph copies the sum back into it
    s = x + r
    return hf_rmsnorm(s, w, 1e-6), s


class CountingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "tests-counting-pass"


def _inputs(rank, n, dtype):
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(TOKENS, HIDDEN, generator=g).to(dtype) for _ in range(n)]
    rs = [torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(7 + i)).to(dtype) for i in range(n)]
    w = (torch.rand(HIDDEN, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    return xs, rs, w


def _errors(outs, refs):
    return [rel_err(o.float(), r.float()) for o, r in zip(outs, refs)]


def _graph_count():
    return len(arfuse.compile_report()["graphs"])


def _graphs_since(count, source):
    return [g for g in arfuse.compile_report()["graphs"][count:] if g["source"] == source]


def _spellings(rank, dtype, dynamic, grad_mode):
    xs, rs, w = _inputs(rank, len(BLOCKS) + len(FP8_BLOCKS), dtype)
    scale_t = torch.tensor([0.25])
    count = _graph_count()
    with grad_mode():
        ref = many_blocks(xs, rs, w, scale_t)
        before = arfuse.stats()["calls"].get("torch_ref", 0)
        outs = arfuse.compile(many_blocks, fullgraph=True, dynamic=dynamic)(xs, rs, w, scale_t)
        calls = arfuse.stats()["calls"].get("torch_ref", 0) - before
    return {"errors": _errors(outs, ref), "dtypes": [str(o.dtype) for o in outs], "calls": calls,
            "graphs": _graphs_since(count, "many_blocks")}


def _views(rank, dtype, dynamic, grad_mode):
    xs, rs, w = _inputs(rank, len(VIEW_BLOCKS) + 1, dtype)
    count = _graph_count()
    with grad_mode():
        ref = view_blocks(xs, rs, w)
        before = arfuse.stats()["calls"].get("torch_ref", 0)
        outs = arfuse.compile(view_blocks, fullgraph=True, dynamic=dynamic)(xs, rs, w)
        calls = arfuse.stats()["calls"].get("torch_ref", 0) - before
    return {"errors": _errors(outs, ref), "shapes": [tuple(o.shape) for o in outs],
            "ref_shapes": [tuple(o.shape) for o in ref], "calls": calls,
            "graphs": _graphs_since(count, "view_blocks")}


def _training(rank):
    xs, rs, w = _inputs(rank, 1, torch.float32)
    r, w = rs[0].clone().requires_grad_(True), w.clone().requires_grad_(True)  # the norm's input needs grad
    count = _graph_count()
    with torch.enable_grad():
        ref = residual_block(xs[0], r, w)
        outs = arfuse.compile(residual_block)(xs[0], r, w)
    return {"errors": _errors(outs, ref), "graphs": _graphs_since(count, "residual_block")}


def _inplace(rank):
    xs, rs, w = _inputs(rank, 1, torch.float32)
    x_eager, x_comp = xs[0].clone(), xs[0].clone()
    count = _graph_count()
    with torch.no_grad():
        ref = inplace_block(x_eager, rs[0], w)
        outs = arfuse.compile(inplace_block, fullgraph=True)(x_comp, rs[0], w)
    return {"errors": _errors(outs, ref), "input_err": rel_err(x_comp, x_eager),
            "input_changed": not torch.equal(x_comp, xs[0]), "graphs": _graphs_since(count, "inplace_block")}


def _isolation(rank):
    xs, rs, w = _inputs(rank, 1, torch.float32)
    counting = CountingPass()
    with torch.no_grad():
        def chained(x, r, w):
            return residual_block(x, r, w)

        before = arfuse.stats()["calls"].get("torch_ref", 0)
        arfuse.compile(chained, options={"post_grad_custom_post_pass": counting})(xs[0], rs[0], w)
        chained_calls = arfuse.stats()["calls"].get("torch_ref", 0) - before
        config = torch._inductor.config
        left = {"post_grad_custom_post_pass": config.post_grad_custom_post_pass,
                "post_grad_custom_pre_pass": config.post_grad_custom_pre_pass}
        graphs_before = len(arfuse.compile_report()["graphs"])
        calls_before = arfuse.stats()["calls"].get("torch_ref", 0)

        def plain(x, r, w):
            return residual_block(x, r, w)

        ref = plain(xs[0], rs[0], w)
        outs = torch.compile(plain, fullgraph=True)(xs[0], rs[0], w)
    return {"counting_calls": counting.calls, "chained_fused_calls": chained_calls, "config": left,
            "errors": _errors(outs, ref), "new_graphs": len(arfuse.compile_report()["graphs"]) - graphs_before,
            "new_calls": arfuse.stats()["calls"].get("torch_ref", 0) - calls_before}


def _rank(rank, world):
    return {"fp32": _spellings(rank, torch.float32, None, torch.no_grad),
            "bf16": _spellings(rank, torch.bfloat16, True, torch.inference_mode),
            "views fp32": _views(rank, torch.float32, None, torch.no_grad),
            "views bf16": _views(rank, torch.bfloat16, True, torch.inference_mode),
            "training": _training(rank), "inplace": _inplace(rank), "isolation": _isolation(rank)}


@pytest.fixture(scope="module")
def ranks():
    return launch(_rank, 2, timeout_s=900)


def _expected():
    """(op, pattern prefix, pattern suffix or suffixes) per block, in graph order, for the fp32 and the bf16 ("lowp") form."""
    out = {}
    for form in ("fp32", "lowp"):
        rows = [("rmsnorm" if r == "no_residual" else "residual_rmsnorm", SPELLINGS[s][1][form], f"/{r}")
                for s, r, _ in BLOCKS]
        fp8 = ("/residual+sum/fp8_static", "/residual+sum/fp8_static_float_scale")
        rows += [("residual_rmsnorm_fp8", f"{form}/hf_rmsnorm/weight_first", fp8)] * 2
        out[form] = rows
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_spelling_matches_once_with_the_expected_pattern(ranks, dtype):
    form = "fp32" if dtype == "fp32" else "lowp"
    for out in ranks:
        graphs = out[dtype]["graphs"]
        assert len(graphs) == 1, graphs
        collectives = graphs[0]["collectives"]
        expected = _expected()[form]
        assert len(collectives) == len(expected)
        problems = []
        for (spelling, residual, _), c, (op, prefix, suffix) in zip(BLOCKS + [(f, "fp8", 0) for f in FP8_BLOCKS],
                                                                     collectives, expected):
            if not (c["fused"] and c["into"] == op and c["pattern"].startswith(prefix)
                    and c["pattern"].endswith(suffix)):
                problems.append(f"{spelling} / {residual}: {c}")
        assert not problems, "\n".join(problems)
        assert out[dtype]["calls"] == len(expected)  # each fused op ran once


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_spelling_gives_the_uncompiled_results(ranks, dtype):
    tol = TOL[torch.float32 if dtype == "fp32" else torch.bfloat16]
    for out in ranks:
        errors, dtypes = out[dtype]["errors"], out[dtype]["dtypes"]
        bad = []
        for i, (err, dt) in enumerate(zip(errors, dtypes)):
            limit = FP8_TOL if "float8" in dt else tol
            if not err <= limit:
                bad.append(f"output {i} ({dt}): {err:.3g} > {limit:g}")
        assert not bad, bad


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_row_views_fuse_and_row_reordering_ops_are_left_alone_with_the_reason(ranks, dtype):
    form = "fp32" if dtype == "fp32" else "lowp"
    for out in ranks:
        result = out[f"views {dtype}"]
        (graph,) = result["graphs"]
        problems = []
        for (name, (_, op, words)), c in zip(VIEW_BLOCKS.items(), graph["collectives"]):
            if op is not None and not (c["fused"] and c["into"] == op and c["pattern"] == form + words):
                problems.append(f"{name}: {c}")
            if op is None and (c["fused"] or words not in c["reason"]):
                problems.append(f"{name}: {c}")
        assert not problems, "\n".join(problems)
        assert result["calls"] == sum(op is not None for _, op, _ in VIEW_BLOCKS.values()) + 1  # + TWO_SUMS
        two = graph["collectives"][len(VIEW_BLOCKS):]
        assert len(two) == 2 and sorted(c["fused"] for c in two) == [False, True], (TWO_SUMS, two)
        fused, alone = (two[0], two[1]) if two[0]["fused"] else (two[1], two[0])
        assert fused["pattern"].startswith(f"{form}/hf_rmsnorm/weight_first/residual+(") and "addend" in fused["pattern"]
        assert "added to the residual of an arfuse fused call" in alone["reason"], alone
        assert result["shapes"] == result["ref_shapes"]  # every output in the shape the graph expected
        shared = graph["collectives"][list(VIEW_BLOCKS).index("shared term added, viewed, then the add")]
        assert any("the additions reordered" in n for n in shared["notes"]), shared
        tol = TOL[torch.float32 if dtype == "fp32" else torch.bfloat16]
        assert max(result["errors"]) <= tol, result["errors"]


def test_scaled_branch_is_reported_as_moved_before_the_call(ranks):
    collectives = ranks[0]["fp32"]["graphs"][0]["collectives"]
    scaled = [c for (s, r, _), c in zip(BLOCKS, collectives) if r.endswith("*m")]
    assert scaled and all(any("applied to the input before the fused call" in n for n in c["notes"])
                          for c in scaled)


def test_autograd_graph_fuses_nothing_and_says_why(ranks):
    for out in ranks:
        t = out["training"]
        assert max(t["errors"]) <= TOL[torch.float32]
        forward = [g for g in t["graphs"] if g["kind"] == "forward"]
        assert len(forward) == 1 and forward[0]["fused"] == 0
        (c,) = forward[0]["collectives"]
        assert c["reason"] == "rsqrt has other users (training graph: saved for backward)", c


def test_inplace_all_reduce_of_an_input_keeps_the_copy(ranks):
    for out in ranks:
        t = out["inplace"]
        assert max(t["errors"]) <= TOL[torch.float32]
        assert t["input_changed"] and t["input_err"] == 0.0  # the input holds the sum, as in eager
        (c,) = t["graphs"][0]["collectives"]
        assert not c["fused"] and "in-place all_reduce of a graph input" in c["reason"], c


def test_callers_pass_is_chained_and_nothing_global_changes(ranks):
    for out in ranks:
        iso = out["isolation"]
        assert iso["counting_calls"] >= 1 and iso["chained_fused_calls"] == 1
        assert iso["config"] == {"post_grad_custom_post_pass": None, "post_grad_custom_pre_pass": None}
        assert iso["new_graphs"] == 0 and iso["new_calls"] == 0  # plain torch.compile: untouched
        assert max(iso["errors"]) <= TOL[torch.float32]
