"""FlashInfer's fused path on 2 and 4 GPUs, through ``AllReduceFusion(backend="flashinfer", strict=True)`` (a silent
fallback raises): every pattern against the float64 reference for 1..2048 tokens at hidden 4096 and 8192 (bf16),
fresh random inputs per rank, NaN-poisoned outputs, bitwise-identical outputs across ranks, the counters showing
FlashInfer calls; CUDA-graph replays with new inputs; TP2 subgroups [0,1] and [2,3] inside 4 ranks.

The fusion kinds beyond the classic four (weight offset, dynamic and per-token-group FP8, also-norm, MoE finalize;
the checks issue 16 runs on 2+ GPUs with ``ARFUSE_ALLOW_UNVERIFIED=1``, after which
``arfuse.backends.flashinfer.VERIFIED`` becomes ``FEATURES``): every spec of ``arfuse.core.spec.catalogue()`` the
installed FlashInfer maps, through ``arfuse.verify.checked_spec_call`` against the float64 reference, bitwise
identical across ranks, in CUDA-graph replays, and MoE indices outside [0, P) adding nothing (as ``torch_ref``).

Set ARFUSE_RESULTS_DIR to write one JSON per test (per case: error, tolerance, pass/fail) for bench/results/.
"""

import pytest
import torch
import torch.distributed as dist

from arfuse import AllReduceFusion, Pattern
from arfuse.backends import flashinfer_patterns
from arfuse.backends.base import ALLOW_UNVERIFIED_ENV
from arfuse.core import operands
from arfuse.core.spec import CLASSIC_FEATURES, FusionSpec, Prologue, Quant, ScaleLayout, catalogue
from arfuse.launch import run_ranks
from arfuse.probe import vote
from arfuse.probe.flashinfer_api import probe
from arfuse.testing import save_results
from arfuse.verify import (TOLERANCE, Case, checked_call, checked_spec_call, digest, output_errors, poison,
                           poisoned_outputs, quant_arg, reference, rel_err)

TOKENS = (1, 2, 3, 8, 17, 64, 128, 512, 1000, 2048)
HIDDENS = (4096, 8192)
MAX_TOKENS = 2048
BF16 = torch.bfloat16


def _cases():
    """(backend, pattern, hidden, tokens): the main pattern over every size and both hiddens with FlashInfer's own
    heuristic; the other patterns and the forced variants over a spread of sizes."""
    out = [("flashinfer", Pattern.RESIDUAL_RMSNORM, h, t) for h in HIDDENS for t in TOKENS]
    for pattern in (Pattern.ALLREDUCE, Pattern.RMSNORM, Pattern.RESIDUAL_RMSNORM_FP8):
        out += [("flashinfer", pattern, h, t) for h in HIDDENS for t in (1, 17, 512, 2048)]
    for variant in ("flashinfer/oneshot", "flashinfer/twoshot"):
        out += [(variant, Pattern.RESIDUAL_RMSNORM, 8192, t) for t in (1, 3, 17, 128, 1000, 2048)]
    return out






def _check(fusion, group, local_rank, group_size, backend, pattern, case, dev, label):
    """One poisoned, checked call; returns its record (collective over ``group``)."""
    c = checked_call(fusion, pattern, case, local_rank, group_size, dev)
    identical = len(set(vote.all_gather_object(c.digest, group))) == 1
    path = fusion.plan(pattern, case.tokens).key
    ok = c.within_tolerance and identical and path.startswith("flashinfer")
    return dict(case=label, backend=backend, path=path, pattern=pattern.name, hidden=case.hidden,
                tokens=case.tokens, err=c.err, err_residual=c.err_residual, tol=c.tol, identical=identical, ok=ok)


def correctness_worker(rank, world, cases, seed):
    dev = torch.device("cuda", torch.cuda.current_device())
    fi = probe()
    if not fi.available:
        return {"error": f"flashinfer unavailable: {fi.reason}"}
    fusions, results = {}, []
    for i, (backend, pattern, hidden, tokens) in enumerate(cases):
        if (backend, hidden) not in fusions:
            fusions[backend, hidden] = AllReduceFusion(max_tokens=MAX_TOKENS, hidden_size=hidden, dtype=BF16,
                                                       device=dev, backend=backend, strict=True)
        case = Case(tokens, hidden, BF16, seed=seed + i)
        results.append(_check(fusions[backend, hidden], None, rank, world, backend, pattern, case, dev,
                              f"tp{world}"))
    stats = {f"{b} {h}": dict(f.stats()) for (b, h), f in fusions.items()}
    for f in fusions.values():
        f.close()
    return {"flashinfer": fi.version, "api": fi.api, "path": fi.path_for(False), "results": results,
            "stats": stats}


def _load(case, rank, dev, x, res, w):
    x.copy_(case.x(rank, dev))
    res.copy_(case.residual(dev))
    w.copy_(case.weight(dev))


def graph_worker(rank, world, hidden, tokens_list, replays):
    """Capture one fused call per size in a CUDA graph; replay with new inputs copied in; check every replay."""
    dev = torch.device("cuda", torch.cuda.current_device())
    f = AllReduceFusion(max_tokens=MAX_TOKENS, hidden_size=hidden, dtype=BF16, device=dev, backend="flashinfer",
                        strict=True)
    records = []
    for tokens in tokens_list:
        x = torch.empty(tokens, hidden, dtype=BF16, device=dev)
        res, w = torch.empty_like(x), torch.empty(hidden, dtype=BF16, device=dev)
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        first = Case(tokens, hidden, BF16, seed=7000 + tokens)
        _load(first, rank, dev, x, res, w)
        f.residual_rmsnorm(x, res, w, first.eps, norm_out=out, residual_out=res_out)  # warm up
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            f.residual_rmsnorm(x, res, w, first.eps, norm_out=out, residual_out=res_out)
        torch.cuda.current_stream().wait_stream(stream)
        for it in range(replays):
            case = Case(tokens, hidden, BF16, seed=8000 + 31 * tokens + it)
            _load(case, rank, dev, x, res, w)
            poison(out)
            poison(res_out)
            graph.replay()
            torch.cuda.synchronize()
            ref, ref_res = reference(case, world, Pattern.RESIDUAL_RMSNORM)
            err, err_res = rel_err(out, ref), rel_err(res_out, ref_res)
            digests = vote.all_gather_object(digest(out, res_out), None)
            records.append(dict(case=f"graph tp{world}", tokens=tokens, hidden=hidden, replay=it, err=err,
                                err_residual=err_res, tol=TOLERANCE[BF16], identical=len(set(digests)) == 1,
                                ok=max(err, err_res) <= TOLERANCE[BF16] and len(set(digests)) == 1))
    stats = {"graph": dict(f.stats())}
    f.close()
    return {"results": records, "stats": stats}


def subgroup_worker(rank, world, cases, seed):
    """TP2 groups [0,1] and [2,3] inside 4 ranks, each with its own inputs."""
    dev = torch.device("cuda", torch.cuda.current_device())
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    index, local = rank // 2, rank % 2
    group = groups[index]
    fusions, results = {}, []
    for i, (backend, pattern, hidden, tokens) in enumerate(cases):
        if hidden not in fusions:
            fusions[hidden] = AllReduceFusion(group, max_tokens=MAX_TOKENS, hidden_size=hidden, dtype=BF16,
                                              device=dev, backend=backend, strict=True)
        case = Case(tokens, hidden, BF16, seed=seed + 1000 * index + i)
        results.append(_check(fusions[hidden], group, local, 2, backend, pattern, case, dev,
                              f"subgroup {[2 * index, 2 * index + 1]}"))
    stats = {str(h): dict(f.stats()) for h, f in fusions.items()}
    for f in fusions.values():
        f.close()
    return {"results": results, "stats": stats, "path": probe().path_for(True)}


def _assert_flashinfer_ran(out):
    assert "error" not in out, out.get("error")
    bad = [r for r in out["results"] if not r["ok"]]
    assert not bad, f"{len(bad)} of {len(out['results'])} cases failed, e.g. {bad[:3]}"
    for name, stats in out["stats"].items():
        assert not stats["fallbacks"], (name, stats["fallbacks"])
        assert stats["calls"] and all(k.startswith("flashinfer") for k in stats["calls"]), (name, stats["calls"])


WORLDS = [pytest.param(2, marks=pytest.mark.gpu(min_gpus=2)), pytest.param(4, marks=pytest.mark.gpu(min_gpus=4))]


@pytest.mark.parametrize("world", WORLDS)
def test_fused_matches_reference(world):
    outs = run_ranks(correctness_worker, world, _cases(), 100 * world, device="cuda", timeout_s=900)
    save_results(f"flashinfer_correctness_tp{world}.json", outs[0])
    for out in outs:
        _assert_flashinfer_ran(out)


@pytest.mark.parametrize("world", WORLDS)
def test_graph_replays(world):
    outs = run_ranks(graph_worker, world, 8192, (1, 17, 512, 2048), 5, device="cuda", timeout_s=900)
    save_results(f"flashinfer_graph_tp{world}.json", outs[0])
    for out in outs:
        _assert_flashinfer_ran(out)


@pytest.mark.gpu(min_gpus=4)
def test_tp2_subgroups_inside_four_ranks():
    cases = [("flashinfer", Pattern.RESIDUAL_RMSNORM, h, t) for h in HIDDENS for t in (1, 3, 17, 512, 2048)]
    cases += [("flashinfer", Pattern.RESIDUAL_RMSNORM_FP8, 8192, t) for t in (1, 512)]
    outs = run_ranks(subgroup_worker, 4, cases, 500, device="cuda", timeout_s=900)
    save_results("flashinfer_subgroup_tp2x2.json", outs)
    for out in outs:
        _assert_flashinfer_ran(out)
    assert outs[0]["results"][0]["case"] != outs[2]["results"][0]["case"]


# -- the fusion kinds beyond the classic four (issue 13; verified by issue 16) ------------------------------------
NEW_SPECS = tuple(s for s in catalogue() if not s.features <= CLASSIC_FEATURES)
SPEC_TOKENS = (1, 17, 128, 512, 2048)
UNVERIFIED_ENV = {ALLOW_UNVERIFIED_ENV: "1"}
# kinds FlashInfer never runs on a trtllm workspace: refused on every release (the rest must run from 0.7.1 on)
NEVER = ("only as packed UE8M0", "mnnvl-cutedsl")


def _spec_case(spec, hidden, tokens, seed):
    return Case(tokens, hidden, BF16, seed=seed, weight_offset=1.0 if spec.weight_offset else 0.0)


def spec_worker(rank, world, hiddens, tokens_list, seed):
    """Every mapped new spec at every size: checked against float64, digests compared across ranks."""
    dev = torch.device("cuda", torch.cuda.current_device())
    fi = probe()
    if not fi.available:
        return {"error": f"flashinfer unavailable: {fi.reason}"}
    results, refused, stats = [], {}, {}
    for hidden in hiddens:
        f = AllReduceFusion(max_tokens=MAX_TOKENS, hidden_size=hidden, dtype=BF16, device=dev, backend="flashinfer",
                            strict=True)
        for i, spec in enumerate(NEW_SPECS):
            why = flashinfer_patterns.refusal(spec, fi, BF16, hidden)
            if why is not None:
                refused[spec.name] = why
                continue
            for tokens in tokens_list:
                case = _spec_case(spec, hidden, tokens, seed + 1000 * i + tokens)
                c = checked_spec_call(f, spec, case, rank, world, dev)
                identical = len(set(vote.all_gather_object(c.digest, None))) == 1
                path = f.plan(spec, tokens).key
                results.append(dict(case=f"tp{world}", spec=spec.name, hidden=hidden, tokens=tokens,
                                    errors=c.errors, identical=identical, path=path,
                                    ok=c.within_tolerance and identical and path.startswith("flashinfer")))
        stats[str(hidden)] = dict(f.stats())
        f.close()
    return {"flashinfer": fi.version, "results": results, "refused": refused, "stats": stats}


def _static_inputs(spec, case, rank, dev):
    """Static input tensors of one call (filled from ``case`` by :func:`_fill`)."""
    t = {"residual": torch.empty(case.tokens, case.hidden, dtype=BF16, device=dev),
         "weight": torch.empty(case.hidden, dtype=BF16, device=dev)}
    if spec.moe:
        t["expert_out"] = torch.empty(case.rows, case.hidden, dtype=BF16, device=dev)
        t["idx"] = torch.empty(case.tokens, case.top_k, dtype=torch.int32, device=dev)
        t["scales"] = torch.empty(case.tokens, case.top_k, dtype=torch.float32, device=dev)
        t["shared"] = torch.empty(case.tokens, case.hidden, dtype=BF16, device=dev)
    else:
        t["x"] = torch.empty(case.tokens, case.hidden, dtype=BF16, device=dev)
    return t


def _fill(t, spec, case, rank, dev):
    t["residual"].copy_(case.residual(dev))
    t["weight"].copy_(case.weight(dev))
    if spec.moe:
        t["expert_out"].copy_(case.expert_out(rank, dev))
        t["idx"].copy_(case.permuted_idx(rank, dev))
        t["scales"].copy_(case.expert_scales(rank, dev))
        t["shared"].copy_(case.shared_expert_out(rank, dev))
    else:
        t["x"].copy_(case.x(rank, dev))


def _static_call(f, spec, case, t, outs, quant):
    """One call of ``spec`` on static tensors into ``outs`` (graph-capturable once it ran eagerly)."""
    offset = case.weight_offset if spec.weight_offset else 0.0
    kw = dict(weight_offset=offset, residual_out=outs["residual_out"])
    if spec.moe:
        f.moe_finalize_residual_rmsnorm(t["expert_out"], t["idx"], t["scales"], t["residual"], t["weight"],
                                        case.eps, shared_expert_out=t["shared"] if spec.shared_expert else None,
                                        norm_out=outs["out"], **kw)
    elif spec.quant:
        f.residual_rmsnorm_quant(t["x"], t["residual"], t["weight"], case.eps, quant=quant, also_norm=spec.also_norm,
                                 quant_out=outs["out"], scale_out=outs.get("scale_out"),
                                 norm_out=outs.get("norm_out"), **kw)
    else:
        f.residual_rmsnorm(t["x"], t["residual"], t["weight"], case.eps, norm_out=outs["out"], **kw)


GRAPH_SPECS = (FusionSpec(weight_offset=True), FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
               FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32, also_norm=True),
               FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0),
               FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0,
                          also_norm=True, weight_offset=True),
               FusionSpec(prologue=Prologue.MOE_FINALIZE),
               FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True, weight_offset=True))


def spec_graph_worker(rank, world, hidden, tokens_list, replays):
    """Each mapped graph spec captured once per size, replayed with new inputs, every replay checked."""
    dev = torch.device("cuda", torch.cuda.current_device())
    fi = probe()
    f = AllReduceFusion(max_tokens=MAX_TOKENS, hidden_size=hidden, dtype=BF16, device=dev, backend="flashinfer",
                        strict=True)
    records = []
    for spec in (s for s in GRAPH_SPECS if flashinfer_patterns.refusal(s, fi, BF16, hidden) is None):
        for tokens in tokens_list:
            first = _spec_case(spec, hidden, tokens, 9000 + tokens)
            t, outs = _static_inputs(spec, first, rank, dev), poisoned_outputs(spec, first, dev)
            quant = quant_arg(spec, first) if spec.quant else None
            _fill(t, spec, first, rank, dev)
            _static_call(f, spec, first, t, outs, quant)  # warm up eagerly
            torch.cuda.synchronize()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                _static_call(f, spec, first, t, outs, quant)
            torch.cuda.current_stream().wait_stream(stream)
            for it in range(replays):
                case = _spec_case(spec, hidden, tokens, 9100 + 31 * tokens + it)
                _fill(t, spec, case, rank, dev)
                for o in outs.values():
                    o.fill_(-1) if o.dtype == torch.int32 else poison(o)
                graph.replay()
                torch.cuda.synchronize()
                got = {k: outs[k] for k in operands.names(spec)}
                errors = output_errors(spec, case, world, got)
                digests = vote.all_gather_object(digest(*got.values()), None)
                records.append(dict(case=f"graph tp{world}", spec=spec.name, tokens=tokens, replay=it, errors=errors,
                                    identical=len(set(digests)) == 1,
                                    ok=all(e <= tol for e, tol in errors.values()) and len(set(digests)) == 1))
    stats = {"graph": dict(f.stats())}
    f.close()
    return {"results": records, "stats": stats}


def moe_guard_worker(rank, world, hidden, tokens):
    """MoE indices outside [0, P) (and -1) add nothing on FlashInfer, as on torch_ref, and are recorded."""
    dev = torch.device("cuda", torch.cuda.current_device())
    spec = FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True)
    case = _spec_case(spec, hidden, tokens, 4242)
    fused = {b: AllReduceFusion(max_tokens=MAX_TOKENS, hidden_size=hidden, dtype=BF16, device=dev, backend=b,
                                strict=True) for b in ("flashinfer", "torch_ref")}
    idx = case.permuted_idx(rank, dev)
    idx[0, 0], idx[-1, -1], idx[tokens // 2, 0] = case.rows, -1, -7  # past the end, FlashInfer's skip, negative
    outs = {}
    for name, f in fused.items():
        r = f.moe_finalize_residual_rmsnorm(case.expert_out(rank, dev), idx, case.expert_scales(rank, dev),
                                            case.residual(dev), case.weight(dev), case.eps,
                                            shared_expert_out=case.shared_expert_out(rank, dev))
        outs[name] = (r.norm, r.residual)
    torch.cuda.synchronize()
    guard = fused["flashinfer"]._executor.workspaces["flashinfer"].input_error()
    err = max(rel_err(outs["flashinfer"][i], outs["torch_ref"][i].cpu().double()) for i in (0, 1))
    for f in fused.values():
        f.close()
    return {"results": [dict(case=f"moe guard tp{world}", err=err, recorded=guard is not None,
                             ok=err <= TOLERANCE[BF16] and guard is not None)],
            "stats": {}}


def _assert_new_specs(out):
    _assert_flashinfer_ran(out)
    if "refused" in out:
        unexpected = {k: v for k, v in out["refused"].items() if not any(w in v for w in NEVER)}
        modern = flashinfer_patterns.route(FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
                                           probe(), probe().path_for(False))[0] is not None
        assert not (modern and unexpected), unexpected  # 0.7.1+ maps every kind but the never-offered ones


@pytest.mark.parametrize("world", WORLDS)
def test_new_fusion_kinds_match_reference(world):
    outs = run_ranks(spec_worker, world, HIDDENS, SPEC_TOKENS, 300 * world, device="cuda", timeout_s=1800,
                     env=UNVERIFIED_ENV)
    save_results(f"flashinfer_new_specs_tp{world}.json", outs[0])
    for out in outs:
        _assert_new_specs(out)


@pytest.mark.parametrize("world", WORLDS)
def test_new_fusion_kinds_in_graph_replays(world):
    outs = run_ranks(spec_graph_worker, world, 8192, (1, 17, 512), 3, device="cuda", timeout_s=900,
                     env=UNVERIFIED_ENV)
    save_results(f"flashinfer_new_specs_graph_tp{world}.json", outs[0])
    for out in outs:
        _assert_new_specs(out)


@pytest.mark.gpu(min_gpus=2)
def test_moe_indices_out_of_range_add_nothing():
    outs = run_ranks(moe_guard_worker, 2, 4096, 17, device="cuda", timeout_s=600, env=UNVERIFIED_ENV)
    save_results("flashinfer_moe_guard_tp2.json", outs[0])
    for out in outs:
        assert out["results"][0]["ok"], out["results"]
