"""A plain Llama-style decoder: RMSNorm, rotary attention with grouped-query heads, SwiGLU MLP, static KV cache.

It knows nothing about tensor parallelism or arfuse (``tp.py`` applies both afterwards, as gpt-fast does). The
residual stream is threaded through the norms the way inference engines do it: a norm called as
``norm(x, residual)`` returns ``(rmsnorm(x + residual), x + residual)``. Each layer therefore makes exactly two
such calls (before attention: the previous layer's MLP output; before the MLP: the attention output), and the
final norm takes the last MLP output. Those are the calls a TP model turns into "allreduce + residual + RMSNorm".

Weights are random, drawn per parameter name from a seed (:func:`random_weight`), so any shard of a parameter
can be rebuilt without the others. Nothing is downloaded.

>>> args = preset("tiny")
>>> model = Transformer(args).init_random_(seed=0)
>>> model.setup_caches(max_batch=2, max_seq_len=16)
>>> logits = model(torch.randint(0, args.vocab_size, (2, 5)))
>>> tuple(logits.shape)
(2, 512)
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    """Shapes of a Llama-style decoder."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0


PRESETS: Dict[str, ModelArgs] = {
    # Small enough for CPU gloo in CI, with GQA (2 query heads per KV head) and every dimension divisible by 4.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, intermediate_size=192,
                      vocab_size=512),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                           intermediate_size=14336, vocab_size=128256),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                            intermediate_size=28672, vocab_size=128256),
}


def preset(name: str, layers: Optional[int] = None) -> ModelArgs:
    """The shapes of preset ``name`` (one of :data:`PRESETS`), with ``layers`` overriding the layer count."""
    if name not in PRESETS:
        raise ValueError(f"preset: name must be one of {', '.join(PRESETS)}, got {name!r}")
    if layers is None:
        return PRESETS[name]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"preset: layers must be a positive int, got {layers!r}")
    return replace(PRESETS[name], n_layers=layers)


# The dimensions tensor parallelism splits across ranks (the hidden size is not split).
TP_SPLIT = ("n_heads", "n_kv_heads", "intermediate_size", "vocab_size")


def rank_shapes(args: ModelArgs, tp: int) -> ModelArgs:
    """The shapes one rank of a TP-``tp`` model computes with: heads, KV heads, MLP width and vocabulary split
    ``tp`` ways, the hidden size kept. A one-device model of these shapes does exactly one rank's arithmetic
    and no communication, so its step time is the floor under every allreduce path of the TP model. (Its
    embedding table, which TP replicates, is split too: a step only gathers its tokens' rows from it.)

    >>> rank_shapes(preset("llama3-70b"), 4).n_kv_heads
    2
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"rank_shapes: tp must be a positive int, got {tp!r}")
    for name in TP_SPLIT:
        if getattr(args, name) % tp:
            raise ValueError(f"rank_shapes: model {name}={getattr(args, name)} is not divisible by tp={tp}")
    return replace(args, **{name: getattr(args, name) // tp for name in TP_SPLIT})


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``) in fp32; returns ``(rmsnorm(s) * weight, s)`` in ``x``'s dtype.

    The norm is taken of the fp32 sum, not of the rounded residual, as fused kernels do.
    """
    s = x.float() if residual is None else x.float() + residual.float()
    normed = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), s.to(x.dtype)


class RMSNorm(nn.Module):
    """``norm(x) -> rmsnorm(x)``; ``norm(x, residual) -> (rmsnorm(x + residual), x + residual)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        normed, summed = add_rmsnorm(x, residual, self.weight, self.eps)
        return normed if residual is None else (normed, summed)


class KVCache(nn.Module):
    """Static key/value cache of shape (batch, kv_heads, max_seq_len, head_dim); fixed addresses for CUDA graphs."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def randomize_(self, generator: torch.Generator) -> None:
        """Fill with random values (timing must not run on zeros)."""
        for t in (self.k, self.v):
            t.copy_(torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype))


def decode_mask(max_seq_len: int, input_pos: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """The additive (1, 1, 1, max_seq_len) attention mask of a decode step at ``input_pos``: 0 where a cache
    position is visible (<= input_pos), -inf elsewhere. Additive rather than boolean, so it is built once per step
    and not converted again in every layer's attention call."""
    hidden = torch.arange(max_seq_len, device=device) > input_pos
    return torch.zeros(max_seq_len, device=device, dtype=dtype).masked_fill(hidden, float("-inf")).view(1, 1, 1, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, seq, heads, head_dim) by per-position ``cos``/``sin`` (seq, head_dim), in fp32."""
    xf = x.float()
    out = xf * cos[:, None, :] + _rotate_half(xf) * sin[:, None, :]
    return out.to(x.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """:func:`apply_rope` of the queries and the keys (one function, so a compiled version is one kernel)."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the concatenated gate/up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def sdpa_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor,
                visible: torch.Tensor) -> torch.Tensor:
    """Decode attention by ``scaled_dot_product_attention``: ``q`` (batch, heads, 1, head_dim) over the cache
    ``keys``/``values`` (batch, kv_heads, max_seq_len, head_dim) under the additive mask ``visible``."""
    bsz, nh, _, hd = q.shape
    nkv = keys.shape[1]
    # A query head h reads KV head h // group; folding the group into the query-length axis lets one SDPA
    # call serve grouped-query attention without copying the cache `group` times.
    folded = q.reshape(bsz, nkv, nh // nkv, hd)
    return F.scaled_dot_product_attention(folded, keys, values, attn_mask=visible).reshape(bsz, nh, 1, hd)


def decode_attention(name: str):
    """The decode-attention function called ``name``: ``"sdpa"`` (:func:`sdpa_decode`, anywhere) or ``"triton"``
    (:func:`arfuse.models.decode_attention.triton_decode`, split-KV, CUDA or Triton's interpreter)."""
    if name == "sdpa":
        return sdpa_decode
    if name == "triton":
        from arfuse.models.decode_attention import triton_decode

        return triton_decode
    raise ValueError(f"decode_attention: name must be 'sdpa' or 'triton', got {name!r}")


@functools.lru_cache(maxsize=None)
def compiled(fn, backend: str = "inductor"):
    """``torch.compile(fn, fullgraph=True, backend=backend)``, one per function, backend and process."""
    return torch.compile(fn, fullgraph=True, backend=backend)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope = rope_qk
        self.decode_attention = sdpa_decode
        self.qkv_proj = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor], visible: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``visible``: in a decode step, the additive (1, 1, 1, max_seq_len) mask of the cache positions to attend
        to (:func:`decode_mask`)."""
        bsz, seq, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k = self.rope(q.view(bsz, seq, nh, hd), k.view(bsz, seq, nkv, hd), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(bsz, seq, nkv, hd).transpose(1, 2)
        cache = self.kv_cache
        if input_pos is None:  # prompt prefill at positions 0..seq-1: causal attention over the new tokens
            cache.k[:bsz, :, :seq].copy_(k)
            cache.v[:bsz, :, :seq].copy_(v)
            group = nh // nkv
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                                 v.repeat_interleave(group, dim=1), is_causal=True)
        else:
            if visible is None:
                visible = decode_mask(cache.k.shape[2], input_pos, q.device, q.dtype)
            out = self._decode(q, k, v, input_pos, visible, bsz)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, nh * hd))

    def _decode(self, q, k, v, input_pos, visible, bsz):
        cache = self.kv_cache
        keys, values = cache.k[:bsz], cache.v[:bsz]
        keys.index_copy_(2, input_pos, k)
        values.index_copy_(2, input_pos, v)
        return self.decode_attention(q, keys, values, input_pos, visible)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.act = swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, cos, sin, input_pos, visible=None):
        """``x``: the previous layer's MLP output (or the embeddings when ``residual`` is None).
        Returns ``(mlp_out, residual)``; the next norm adds the two."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, input_pos, visible), residual)
        return self.mlp(h), residual


class Transformer(nn.Module):
    """``model(tokens)`` prefills a prompt (batch, seq) at positions 0..seq-1; ``model(tokens, input_pos)``
    decodes one token per row (batch, 1) at position ``input_pos`` (a 1-element long tensor, so one CUDA graph
    serves every step). Returns the logits of the last position, (batch, vocab).
    Call :meth:`setup_caches` first."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_seq_len = 0

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        """(Re)allocate every layer's KV cache and the rotary tables, on the weights' device and dtype."""
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"setup_caches: max_batch and max_seq_len must be >= 1, got {max_batch}, {max_seq_len}")
        weight = self.lm_head.weight
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = None  # free the old cache before allocating the new one
            attn.kv_cache = KVCache(max_batch, attn.n_kv_heads, max_seq_len, attn.head_dim, weight.dtype,
                                    weight.device)
        hd = self.args.head_dim
        inv_freq = 1.0 / (self.args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("rope_cos", angles.cos().to(weight.device), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(weight.device), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq = tokens.shape
        cache = self.layers[0].self_attn.kv_cache if len(self.layers) else None
        if cache is None or batch > cache.k.shape[0] or seq > self.max_seq_len:
            raise ValueError(f"Transformer: tokens {tuple(tokens.shape)} need setup_caches(max_batch>={batch}, "
                             f"max_seq_len>={seq}) first")
        if input_pos is not None and seq != 1:
            raise ValueError(f"Transformer: a decode step (input_pos given) takes one token per row, got {seq}")
        visible = None
        if input_pos is None:
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            visible = decode_mask(self.max_seq_len, input_pos, self.rope_cos.device, self.lm_head.weight.dtype)
        x, residual = self.embed_tokens(tokens), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, input_pos, visible)
        h, _ = self.norm(x, residual)
        return self.lm_head(h[:, -1])

    def compile_pointwise_(self, backend: str = "inductor") -> "Transformer":
        """Run the rotary embedding and the SwiGLU activation as ``torch.compile``'d functions (a kernel or two
        each instead of about eight and two per layer), as serving engines fuse them. Same results within
        rounding; compiles on first use of each shape, so warm up before capturing CUDA graphs. ``backend``:
        torch.compile's. Returns ``self``."""
        for layer in self.layers:
            layer.self_attn.rope = compiled(rope_qk, backend)
            layer.mlp.act = compiled(swiglu, backend)
        return self

    def use_decode_attention_(self, name: str) -> "Transformer":
        """Run every layer's decode attention with :func:`decode_attention` ``name`` (prefill keeps SDPA).
        ``"triton"`` compiles its kernels on first use of each shape: warm up before capturing CUDA graphs.
        Returns ``self``."""
        fn = decode_attention(name)
        for layer in self.layers:
            layer.self_attn.decode_attention = fn
        return self

    def init_random_(self, seed: int) -> "Transformer":
        """Fill every parameter with :func:`random_weight` for its name. Returns ``self``."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(random_weight(name, tuple(p.shape), seed, p.dtype, p.device))
        return self


def random_weight(name: str, shape: Tuple[int, ...], seed: int, dtype: torch.dtype,
                  device) -> torch.Tensor:
    """The full random tensor of parameter ``name``: a function of (name, shape, seed, dtype, device type) only.

    Linear weights ~ N(0, 1/fan_in) keep activations O(1) through many layers; norm weights ~ 1 + N(0, 0.1^2)
    so a wrong weight is visible; embeddings ~ N(0, 1).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g, dtype=dtype, device=device)
    if name.endswith("norm.weight"):
        return t.mul_(0.1).add_(1.0)
    if name.startswith("embed_tokens"):
        return t
    return t.mul_(shape[-1] ** -0.5)
