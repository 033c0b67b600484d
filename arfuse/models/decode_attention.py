"""Split-KV decode attention in Triton, for the e2e model's decode steps on GPUs ("flash decoding").

One new token per sequence attends to cache positions ``0..input_pos``. SDPA's kernels run one block per
(batch, KV head) for such a call: at batch 1 of a TP4 rank of Llama-3-70B (2 KV heads) that is two blocks
streaming 1 MiB between them, ~23 µs per layer on an H200. Here the cache length is cut into chunks, one program
per (batch, KV head, chunk) computes that chunk's attention for all the head's query heads (a partial output and
its log-sum-exp), and a second kernel combines the chunks. The position is read from device memory, so one CUDA
graph serves every step. Chunks past the position load nothing and weigh nothing in the combination.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks them.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the model runs without Triton; only this attention needs it
    triton = None

BLOCK_N = 64  # cache positions per inner step (and the smallest chunk)
MIN_ROWS = 16  # tl.dot's smallest M and K: a KV head's query heads and the head dimension are padded up to it
MAX_HEAD_DIM = 256
WAVES = 2  # programs per SM aimed at when choosing the chunk count
NUM_WARPS, NUM_STAGES = 4, 3  # of the chunk kernel


def split_plan(programs: int, length: int, sms: int) -> Tuple[int, int]:
    """(chunks, chunk length) for ``programs`` (batch x KV heads) over a cache of ``length``: enough chunks to give
    every SM ``WAVES`` programs, each at least ``BLOCK_N`` positions long.

    >>> split_plan(2, 1024, 132), split_plan(128, 1024, 132), split_plan(1, 40, 132)
    ((16, 64), (3, 384), (1, 64))
    """
    chunks = max(1, min(_cdiv(length, BLOCK_N), _cdiv(WAVES * sms, programs)))
    chunk = _cdiv(_cdiv(length, chunks), BLOCK_N) * BLOCK_N  # rounded up to whole steps, so maybe fewer chunks
    return _cdiv(length, chunk), chunk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any count works, an H200's keeps CPU tests on GPU-like plans
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    @triton.jit
    def attention_chunk_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_ptr, lse_ptr, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b,
                               sv_h, sv_n, n_kv_heads, chunks, qk_scale, CHUNK: tl.constexpr, GROUP: tl.constexpr,
                               ROWS: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        bh = tl.program_id(0)
        c = tl.program_id(1)
        b = bh // n_kv_heads
        h = bh % n_kv_heads
        g = tl.arange(0, ROWS)
        d = tl.arange(0, D)
        rows = g < GROUP
        dims = d < HD  # D pads the head dimension to tl.dot's smallest K
        q = tl.load(q_ptr + b * sq_b + (h * GROUP + g)[:, None] * sq_h + d[None, :], mask=rows[:, None] & dims,
                    other=0.0)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, tl.load(pos_ptr).to(tl.int32) + 1)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        # A fixed trip count (the chunk's), so the loop pipelines; steps past the position load nothing
        # (masked) and add nothing (exp2(-inf) = 0, with a finite stand-in while every score is -inf).
        for off in range(0, CHUNK, BLOCK):
            n = start + off + tl.arange(0, BLOCK)
            cols = n < end
            k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=cols[:, None] & dims, other=0.0)
            s = tl.where(cols[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))  # log2 units
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=cols[:, None] & dims, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        filled = total > 0  # False for a chunk wholly past the position
        out = tl.where(filled[:, None], acc / tl.where(filled, total, 1.0)[:, None], 0.0)
        lse = tl.where(filled, m + tl.log2(tl.where(filled, total, 1.0)), float("-inf"))
        row = (bh * chunks + c) * GROUP + g
        tl.store(part_ptr + row[:, None] * HD + d[None, :], out, mask=rows[:, None] & dims)
        tl.store(lse_ptr + row, lse, mask=rows)

    @triton.jit
    def attention_combine_kernel(part_ptr, lse_ptr, out_ptr, so_b, so_h, n_heads, chunks, GROUP: tl.constexpr,
                                 CHUNKS: tl.constexpr, HD: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)  # b * n_heads + query head
        b = pid // n_heads
        hq = pid % n_heads
        bh = pid // GROUP  # b * n_kv_heads + KV head
        g = hq % GROUP
        c = tl.arange(0, CHUNKS)
        d = tl.arange(0, D)
        live = c < chunks
        dims = d < HD
        row = (bh * chunks + c) * GROUP + g
        lse = tl.load(lse_ptr + row, mask=live, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))  # chunk 0 is never empty, so the max is finite
        parts = tl.load(part_ptr + row[:, None] * HD + d[None, :], mask=live[:, None] & dims, other=0.0)
        out = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
        tl.store(out_ptr + b * so_b + hq * so_h + d, out.to(out_ptr.dtype.element_ty), mask=dims)


def triton_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor,
                  visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention: ``q`` (batch, heads, 1, head_dim) over ``keys``/``values`` (batch, kv_heads,
    max_seq_len, head_dim), cache positions ``0..input_pos[0]`` visible (``visible``, the additive mask, is
    unused). Same call as :func:`arfuse.models.llama.sdpa_decode`; returns (batch, heads, 1, head_dim), laid out
    as (batch, 1, heads, head_dim) so the output projection reads it without a copy."""
    if triton is None:
        raise RuntimeError("triton_decode needs Triton (pip install 'arfuse[triton]')")
    bsz, heads, one, hd = q.shape
    _, kv_heads, length, _ = keys.shape
    if one != 1 or heads % kv_heads or not 0 < hd <= MAX_HEAD_DIM:
        raise ValueError(f"triton_decode: expected q (batch, heads, 1, head_dim) with heads a multiple of the "
                         f"cache's {kv_heads} KV heads and head_dim at most {MAX_HEAD_DIM}, got {tuple(q.shape)}")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("triton_decode: q, keys and values need a contiguous last (head_dim) dimension")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(f"triton_decode: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 before "
                         f"importing Triton), got {q.device}")
    group = heads // kv_heads
    padded = max(MIN_ROWS, triton.next_power_of_2(hd))
    chunks, chunk = split_plan(bsz * kv_heads, length, _sm_count(q.device))
    part = torch.empty((bsz * kv_heads * chunks * group, hd), dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz * kv_heads * chunks * group, dtype=torch.float32, device=q.device)
    out = torch.empty((bsz, 1, heads, hd), dtype=q.dtype, device=q.device).transpose(1, 2)
    qk_scale = hd ** -0.5 * 1.4426950408889634  # softmax in base 2
    attention_chunk_kernel[(bsz * kv_heads, chunks)](
        q, keys, values, input_pos, part, lse, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), kv_heads, chunks, qk_scale,
        CHUNK=chunk, GROUP=group, ROWS=max(MIN_ROWS, triton.next_power_of_2(group)), HD=hd, D=padded,
        BLOCK=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    attention_combine_kernel[(bsz * heads,)](part, lse, out, out.stride(0), out.stride(1), heads, chunks,
                                             GROUP=group, CHUNKS=triton.next_power_of_2(chunks), HD=hd, D=padded,
                                             num_warps=4)
    return out
