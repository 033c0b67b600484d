"""FlashInfer's fused path on 2 and 4 GPUs, through ``AllReduceFusion(backend="flashinfer", strict=True)`` (a silent
fallback raises): every pattern against the float64 reference for 1..2048 tokens at hidden 4096 and 8192 (bf16),
fresh random inputs per rank, NaN-poisoned outputs, bitwise-identical outputs across ranks, the counters showing
FlashInfer calls; CUDA-graph replays with new inputs; TP2 subgroups [0,1] and [2,3] inside 4 ranks.

Set ARFUSE_RESULTS_DIR to write one JSON per test (per case: error, tolerance, pass/fail) for bench/results/.
"""

import pytest
import torch
import torch.distributed as dist

from arfuse import AllReduceFusion, Pattern
from arfuse.launch import run_ranks
from arfuse.probe import vote
from arfuse.probe.flashinfer_api import probe
from arfuse.testing import save_results
from arfuse.verify import TOLERANCE, Case, checked_call, digest, poison, reference, rel_err

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
