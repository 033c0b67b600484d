"""``arfuse.compile`` on one GPU (bf16).

An HF Llama at world size 1 has no collectives: the compiled output equals plain ``torch.compile``'s and the
report says there is nothing to fuse; the same with ``mode="reduce-overhead"`` (CUDA graphs), and for the MoE
families Qwen3-MoE and Mixtral (compiled and run; the report says why nothing fused). Then a 1-rank
NCCL group with explicit ``funcol.all_reduce``s under ``mode="reduce-overhead"``: the residual + RMSNorm block is
fused into ``residual_rmsnorm`` and the plain allreduce into arfuse's ``all_reduce`` (CUDA has a fast path), the
fusion objects are created in the warm-up run, not during capture, and every replay gives the eager result.
"""
from __future__ import annotations

import pytest
import torch

import arfuse
from arfuse.launch import run_ranks
from arfuse.models.generate import rel_err

pytestmark = pytest.mark.gpu
BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    from arfuse.models import hf

    return hf.build(hf.config("llama", "tiny"), seed=0, dtype=torch.bfloat16, device="cuda")


def _ids():
    return torch.arange(24, device="cuda").view(2, 12) % 128


def test_hf_model_at_world_size_1_is_unchanged(hf_model):
    ids = _ids()
    stats = arfuse.stats()
    with torch.no_grad():
        eager = hf_model(input_ids=ids, use_cache=False).logits
        plain = torch.compile(hf_model, fullgraph=True)(input_ids=ids, use_cache=False).logits
        fused = arfuse.compile(hf_model, fullgraph=True)(input_ids=ids, use_cache=False).logits
    assert rel_err(fused, plain) <= 1e-6 and rel_err(fused, eager) <= BF16_TOL
    assert arfuse.stats() == stats
    graphs = arfuse.compile_report("LlamaForCausalLM")["graphs"]
    assert graphs and all(g["collectives"] == [] and g["note"] == "no collectives: nothing to fuse" for g in graphs)


def test_hf_model_with_cuda_graphs(hf_model):
    ids = _ids()
    with torch.no_grad():
        eager = hf_model(input_ids=ids, use_cache=False).logits
        compiled = arfuse.compile(hf_model, mode="reduce-overhead")
        outs = [compiled(input_ids=ids, use_cache=False).logits.clone() for _ in range(4)]
    assert all(rel_err(o, eager) <= BF16_TOL for o in outs)
    assert all(torch.equal(o, outs[-1]) for o in outs[1:])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_hf_moe_model_at_world_size_1_compiles_runs_and_reports_nothing_to_fuse(family):
    pytest.importorskip("transformers")
    from tests._autofuse_models import moe_at_world_size_1

    r = moe_at_world_size_1(family, "cuda", torch.bfloat16)
    assert r["err"] <= BF16_TOL and r["stats_unchanged"]
    assert r["graphs"] and all(g["collectives"] == [] and g["note"] == "no collectives: nothing to fuse"
                               for g in r["graphs"]), r["report"]


def _hf_norm(h, w, eps=1e-6):
    dtype = h.dtype
    h32 = h.to(torch.float32)
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return w * h32.to(dtype)


def _tp_step(x, residual, w, proj):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    s = residual + funcol.all_reduce(x, "sum", dist.group.WORLD)
    h = _hf_norm(s, w)
    plain = funcol.all_reduce(h @ proj, "sum", dist.group.WORLD)  # feeds a matmul: a plain allreduce
    return plain @ proj.T, s


def _cuda_graph_rank(rank, world):
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device())
    x, r = torch.randn(8, 256, device=dev, dtype=torch.bfloat16), torch.randn(8, 256, device=dev, dtype=torch.bfloat16)
    w, proj = torch.rand(256, device=dev, dtype=torch.bfloat16) + 0.5, torch.randn(256, 256, device=dev,
                                                                                   dtype=torch.bfloat16) / 16
    with torch.no_grad():
        eager = _tp_step(x, r, w, proj)
        compiled = arfuse.compile(_tp_step, mode="reduce-overhead", fullgraph=True, max_tokens=64)
        runs = [tuple(t.clone() for t in compiled(x, r, w, proj)) for _ in range(5)]
    torch.cuda.synchronize()
    return {"errors": [max(rel_err(a, b) for a, b in zip(run, eager)) for run in runs],
            "report": arfuse.compile_report("_tp_step"), "stats": arfuse.stats()}


@pytest.mark.gpu(min_gpus=1)
def test_fused_ops_under_cuda_graphs():
    out = run_ranks(_cuda_graph_rank, 1, device="cuda", timeout_s=300)[0]
    assert max(out["errors"]) <= BF16_TOL, out["errors"]
    (graph,) = out["report"]["graphs"]
    into = sorted(c["into"] for c in graph["collectives"] if c["fused"])
    assert into == ["all_reduce", "residual_rmsnorm"], graph
    assert sum(out["stats"]["calls"].values()) >= 2 and out["stats"]["errors"] == {}
