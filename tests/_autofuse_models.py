"""A hand-written TP decoder for the ``arfuse.compile`` tests: ``parallelize_module`` (ColwiseParallel on
q/k/v/gate/up and the lm_head, RowwiseParallel on o_proj/down_proj), ``nn.RMSNorm``, and a vocabulary-parallel
embedding that sums its shards with ``funcol.all_reduce``. The same class at world size 1 is the single-process
reference."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, HEAD_DIM, MLP, LAYERS = 96, 64, 4, 16, 128, 2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, h):
        b, s, _ = h.shape
        q, k, v = (p(h).view(b, s, -1, HEAD_DIM).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.up_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.down_proj = nn.Linear(MLP, HIDDEN, bias=False)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(HIDDEN, eps=1e-5)
        self.self_attn = Attention()
        self.post_attention_layernorm = nn.RMSNorm(HIDDEN, eps=1e-5)
        self.mlp = MLPBlock()

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding; out-of-shard ids look up zeros, and ``funcol.all_reduce`` sums."""

    def __init__(self, full: torch.Tensor, rank: int, world: int):
        super().__init__()
        rows = full.shape[0] // world
        self.start, self.rows, self.world = rank * rows, rows, world
        self.weight = nn.Parameter(full[self.start:self.start + rows].clone(), requires_grad=False)

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return funcol.all_reduce(out, "sum", dist.group.WORLD) if self.world > 1 else out


class HandTP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(HIDDEN, eps=1e-5)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.RMSNorm):
                    m.weight.uniform_(0.5, 1.5)
        self.requires_grad_(False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def parallelize(model: HandTP, world: int) -> HandTP:
    """Shard ``model`` (in place) over the default group's ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    plan = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(LAYERS):
        plan.update({f"layers.{i}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")})
        plan.update({f"layers.{i}.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
        plan[f"layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.detach(), dist.get_rank(), world)
    return model


def moe_at_world_size_1(family: str, device: str, dtype: torch.dtype) -> dict:
    """``arfuse.compile`` of a tiny HF MoE model (one layer) in one process without a process group: its logits
    against eager's, whether ``arfuse.stats()`` changed (no fused call may run) and its report's graphs."""
    import arfuse
    from arfuse.models import generate, hf

    model = hf.build(hf.config(family, "tiny", layers=1), seed=0, dtype=dtype, device=device, random_norms=True)
    ids = (torch.arange(24, device=device).view(2, 12) * 7) % model.config.vocab_size
    before = arfuse.stats()
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits.float()
        # graph breaks are Dynamo's business here (an MoE router may have data-dependent ops on some devices)
        fused = arfuse.compile(model)(input_ids=ids, use_cache=False).logits.float()
    graphs = arfuse.compile_report(type(model).__name__)["graphs"]
    return {"err": generate.rel_err(fused, eager), "stats_unchanged": arfuse.stats() == before, "graphs": graphs,
            "report": str(arfuse.compile_report(type(model).__name__))}
