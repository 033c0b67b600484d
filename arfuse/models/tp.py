"""Tensor parallelism for :class:`arfuse.models.llama.Transformer`, applied after construction (as in gpt-fast).

:func:`shard_` splits the linears over a ``torch.distributed`` group: q/k/v and gate/up column-parallel (each
part split separately, so a rank's slice stays ``[q_r; k_r; v_r]``), o/down row-parallel, whose outputs are then
partial sums; the vocabulary projection column-parallel with an all-gather of the logits. Embeddings are
replicated. No allreduce is added after o/down: the next norm does it. :class:`NormSwitch` installs, in every
norm that receives a partial sum (each layer's post-attention norm, the next layer's input norm, the final
norm: two per layer), one of

- ``"unfused"``: ``torch.distributed.all_reduce`` then a ``torch.compile``'d add + RMSNorm (the NCCL baseline);
- ``"auto"`` or an arfuse backend name: :class:`arfuse.FusedAddRMSNorm` over one :class:`arfuse.AllReduceFusion`.

Switching keeps the weights: every path's norms share the model's norm parameters.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import arfuse
from arfuse.models.llama import TP_SPLIT, ModelArgs, RMSNorm, Transformer, add_rmsnorm, random_weight

UNFUSED = "unfused"


@dataclass(frozen=True)
class TPConfig:
    """How :class:`NormSwitch` builds a norm path.

    ``max_tokens``: the most tokens one call carries (the longest prefill times its batch, or the largest decode
    batch). ``strict``: passed to :class:`arfuse.AllReduceFusion` (None follows ``arfuse.strict``).
    ``compile_norm``: compile the unfused path's add + RMSNorm; None compiles on CUDA only, because inductor's
    C++ build takes about 30 s per process on CPU.
    """

    max_tokens: int = 2048
    strict: Optional[bool] = None
    compile_norm: Optional[bool] = None


@dataclass(frozen=True)
class Shard:
    """A parameter split along ``dim``: the full tensor is the concatenation of ``parts`` (their full sizes)
    and each rank holds its chunk of every part."""

    dim: int
    parts: Tuple[int, ...]
    full_shape: Tuple[int, ...]


def _group_info(group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def take_shard(full: torch.Tensor, shard: Shard, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` under ``shard``."""
    pieces = full.split(list(shard.parts), dim=shard.dim)
    return torch.cat([p.chunk(world_size, dim=shard.dim)[rank] for p in pieces], dim=shard.dim)


def _gather_vocab(group, world_size: int, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
    output = output.contiguous()
    if output.is_cuda:  # one NCCL all-gather into one buffer: the form CUDA-graph capture handles best
        stacked = output.new_empty((world_size,) + tuple(output.shape))
        dist.all_gather_into_tensor(stacked, output, group=group)
    else:
        parts = [torch.empty_like(output) for _ in range(world_size)]
        dist.all_gather(parts, output, group=group)
        stacked = torch.stack(parts)
    return stacked.movedim(0, -2).reshape(*output.shape[:-1], world_size * output.shape[-1])


def _check_divisible(args: ModelArgs, world_size: int) -> None:
    for name in TP_SPLIT:
        if getattr(args, name) % world_size:
            raise ValueError(f"shard_: model {name}={getattr(args, name)} is not divisible by the group's "
                             f"world size {world_size}")


def shard_(model: Transformer, group=None) -> Dict[str, Shard]:
    """Split ``model``'s linears for this rank of ``group`` (in place; works on the ``meta`` device too).

    Returns the split of every sharded parameter by name. Not collective (the logits all-gather hook it adds
    is, at run time).
    """
    world_size, rank = _group_info(group)
    _check_divisible(model.args, world_size)
    if world_size == 1:
        return {}
    a = model.args
    qkv = (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim)
    plan: List[Tuple[str, int, Tuple[int, ...]]] = [("lm_head", 0, (a.vocab_size,))]
    for i, layer in enumerate(model.layers):
        plan += [(f"layers.{i}.self_attn.qkv_proj", 0, qkv), (f"layers.{i}.self_attn.o_proj", 1, (qkv[0],)),
                 (f"layers.{i}.mlp.gate_up_proj", 0, (a.intermediate_size,) * 2),
                 (f"layers.{i}.mlp.down_proj", 1, (a.intermediate_size,))]
        layer.self_attn.n_heads = a.n_heads // world_size
        layer.self_attn.n_kv_heads = a.n_kv_heads // world_size
    shards = {}
    for path, dim, parts in plan:
        linear = model.get_submodule(path)
        shard = Shard(dim, parts, tuple(linear.weight.shape))
        with torch.no_grad():
            linear.weight = nn.Parameter(take_shard(linear.weight, shard, rank, world_size).clone(),
                                         requires_grad=linear.weight.requires_grad)
        linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]
        shards[f"{path}.weight"] = shard
    model.lm_head.register_forward_hook(functools.partial(_gather_vocab, group, world_size))
    return shards


def build(args: ModelArgs, *, seed: int, dtype: torch.dtype, device, group=None) -> Transformer:
    """This rank's shard of the model with random weights: exactly the slices of
    ``Transformer(args).init_random_(seed)`` (same dtype and device type), built without the full model."""
    world_size, rank = _group_info(group)
    with torch.device("meta"):
        model = Transformer(args)
    shards = shard_(model, group)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shard = shards.get(name)
            if shard is None:
                p.copy_(random_weight(name, tuple(p.shape), seed, dtype, device))
            else:
                full = random_weight(name, shard.full_shape, seed, dtype, device)
                p.copy_(take_shard(full, shard, rank, world_size))
                del full
    return model.requires_grad_(False)


@functools.lru_cache(maxsize=None)
def _compiled_add_rmsnorm():
    return torch.compile(add_rmsnorm, fullgraph=True)


class UnfusedAddRMSNorm(nn.Module):
    """``torch.distributed.all_reduce(x)`` (in place: ``x`` is a fresh partial sum) then add + RMSNorm.
    Same call shape as :class:`RMSNorm` and :class:`arfuse.FusedAddRMSNorm`. Collective; graph-capturable
    after a warm-up call per shape (the compiled norm must not compile during capture)."""

    def __init__(self, norm: RMSNorm, group, compiled: bool):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self.group = group
        self.world_size, _ = _group_info(group)
        self.compiled = compiled

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        fn = _compiled_add_rmsnorm() if self.compiled else add_rmsnorm
        # (tokens, hidden) whatever the batch layout, so the compiled norm sees one varying dimension
        flat = x.reshape(-1, x.shape[-1])
        normed, summed = fn(flat, None if residual is None else residual.reshape(flat.shape), self.weight, self.eps)
        return normed.view(x.shape) if residual is None else (normed.view(x.shape), summed.view(x.shape))


def fused_norm_sites(model: Transformer) -> List[Tuple[nn.Module, str]]:
    """(parent, attribute) of every norm that receives a partial sum: two per layer. Layer 0's input norm
    is not one of them (it sees the replicated embeddings)."""
    sites: List[Tuple[nn.Module, str]] = []
    for i, layer in enumerate(model.layers):
        if i > 0:
            sites.append((layer, "input_layernorm"))
        sites.append((layer, "post_attention_layernorm"))
    sites.append((model, "norm"))
    return sites


class NormSwitch:
    """Installs one norm path at a time in a sharded model (see the module docstring for the paths).

    ``use(path)`` is collective for the arfuse paths (it constructs an :class:`arfuse.AllReduceFusion`); call it
    on every rank, before any CUDA-graph capture. The previous path's fusion object is closed.
    """

    def __init__(self, model: Transformer, group=None, config: TPConfig = TPConfig()):
        self.model = model
        self.group = group
        self.config = config
        self.sites = fused_norm_sites(model)
        self.plain = [getattr(parent, attr) for parent, attr in self.sites]
        self.fusion: Optional[arfuse.AllReduceFusion] = None
        self.path: Optional[str] = None

    def use(self, path: str) -> None:
        if not isinstance(path, str):
            raise TypeError(f"NormSwitch.use: norm_path must be a str, got {type(path).__name__}")
        self.close()  # back to the plain norms, so a failed construction below leaves no closed fusion installed
        weight = self.plain[0].weight
        if path == UNFUSED:
            compiled = self.config.compile_norm
            compiled = weight.device.type == "cuda" if compiled is None else compiled
            modules = [UnfusedAddRMSNorm(norm, self.group, compiled) for norm in self.plain]
        else:
            self.fusion = arfuse.AllReduceFusion(self.group, max_tokens=self.config.max_tokens,
                                                 hidden_size=weight.shape[0], dtype=weight.dtype,
                                                 device=weight.device, backend=path, strict=self.config.strict)
            modules = []
            for norm in self.plain:
                fused = arfuse.FusedAddRMSNorm(weight.shape[0], norm.eps, fusion=self.fusion)
                fused.weight = norm.weight
                modules.append(fused)
        for (parent, attr), module in zip(self.sites, modules):
            setattr(parent, attr, module)
        self.path = path

    def stats(self) -> dict:
        """The fusion object's path counters (empty for the unfused path). Under CUDA graphs a capture counts
        once, its replays not at all."""
        return dict(self.fusion.stats()) if self.fusion is not None else {}

    def plans(self, token_counts) -> Dict[int, str]:
        """Which arfuse backend/variant runs a fused call of each token count (empty for the unfused path)."""
        if self.fusion is None:
            return {}
        return {n: self.fusion.plan(arfuse.Pattern.RESIDUAL_RMSNORM, n).key for n in token_counts}

    def _close_fusion(self) -> None:
        if self.fusion is not None:
            self.fusion.close()
            self.fusion = None

    def close(self) -> None:
        """Restore the plain norms and free the fusion object. Not collective."""
        self._close_fusion()
        for (parent, attr), norm in zip(self.sites, self.plain):
            setattr(parent, attr, norm)
        self.path = None
