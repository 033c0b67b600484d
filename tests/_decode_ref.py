"""A float64 reference for decode attention and its inputs, shared by the CPU and GPU model tests
(compare with :func:`arfuse.models.generate.rel_err`)."""
from __future__ import annotations

import math

import torch


def reference_decode(q, keys, values, pos: int) -> torch.Tensor:
    """Grouped-query attention of one new token over cache positions 0..pos, in float64."""
    q, keys, values = q.double(), keys.double(), values.double()
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores[..., pos + 1:] = float("-inf")
    return scores.softmax(-1) @ values


def decode_inputs(batch, heads, kv_heads, length, head_dim, dtype, device, seed):
    """Random (q, keys, values) of one decode step: q (batch, heads, 1, head_dim), a cache (batch, kv_heads,
    length, head_dim) each."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = ((batch, heads, 1, head_dim), (batch, kv_heads, length, head_dim), (batch, kv_heads, length, head_dim))
    return tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for shape in shapes)
