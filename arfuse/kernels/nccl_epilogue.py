"""The NCCL path's kernels, around ``dist.all_reduce``: the MoE finalize prologue before it (writing this rank's
dtype-rounded input rows into the buffer NCCL reduces) and the epilogue after it, for every spec.

Equivalent torch::

    buffer = moe_finalize(expert_out, idx, scales, shared).to(dtype)      # moe_finalize_kernel (MoE specs)
    dist.all_reduce(buffer)                                               # NCCL (skipped at world size 1)
    arfuse.core.math.epilogue(spec, buffer, call)                         # rmsnorm_epilogue_kernel

One epilogue kernel instead of several, so "NCCL all_reduce + this" is the best unfused path (and the multi-node
path). The epilogue takes ROWS rows per tile (2-D tiles for more bytes in flight per CTA) and loops over tiles
(persistent grid); the MoE finalize takes BLOCK_H columns of one token per tile (below the row's width a token is
split over several CTAs, which a decode-sized call needs to use more than a few SMs) and SLOTS expert slots per
step. ``nccl_launch.epilogue_launch`` / ``moe_launch`` pick the launches (``launch_table``: per hidden size and
token range).
"""
import sys

import torch
import triton
import triton.language as tl

from arfuse.kernels._epilogue import finish_row, load_residual, load_weight
from arfuse.kernels._launch import ArgKey, Launcher
from arfuse.kernels._prologue import moe_finalize_row
from arfuse.kernels.launch_config import epilogue_args, prologue_args
from arfuse.kernels.nccl_launch import EpilogueLaunch, MoeLaunch, epilogue_grid, epilogue_launch, moe_grid, moe_launch

_RUNTIME = ["scale_row_stride", "scale_col_stride", "eps", "weight_offset", "n_rows"]


@triton.jit(do_not_specialize=_RUNTIME)
def rmsnorm_epilogue_kernel(sum_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr,
                            scale_row_stride, scale_col_stride, eps, weight_offset, n_rows, H: tl.constexpr,
                            BLOCK_H: tl.constexpr, ROWS: tl.constexpr, EVICT_FIRST: tl.constexpr, EPI: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    STREAM: tl.constexpr = "evict_first" if EVICT_FIRST else ""
    KEEP: tl.constexpr = "evict_last" if EVICT_FIRST else ""
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    outs = (out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride)
    w = load_weight(w_ptr, cols, cmask, weight_offset, EPI, KEEP)
    if ROWS == 1:
        for row in range(pid, n_rows, nprog):
            offs = tl.cast(row, tl.int64) * H + cols
            acc = tl.load(sum_ptr + offs, mask=cmask, other=0.0, eviction_policy=STREAM).to(tl.float32)
            res = load_residual(res_ptr, offs, cmask, EPI, STREAM)
            finish_row(acc, res, w, offs, cmask, row, row < n_rows, outs, eps, H, EPI)
    else:
        for tile in range(pid, tl.cdiv(n_rows, ROWS), nprog):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
            mask = row_ok[:, None] & cmask[None, :]
            acc = tl.load(sum_ptr + offs, mask=mask, other=0.0, eviction_policy=STREAM).to(tl.float32)
            res = load_residual(res_ptr, offs, mask, EPI, STREAM)
            finish_row(acc, res, w, offs, mask, rows, row_ok, outs, eps, H, EPI)


@triton.jit(do_not_specialize=["n_expert_rows", "top_k", "n_rows"])
def moe_finalize_kernel(x_ptr, idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k, out_ptr, n_rows,
                        H: tl.constexpr, BLOCK_H: tl.constexpr, SLOTS: tl.constexpr, EPI: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    CHUNKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    lane = tl.arange(0, BLOCK_H)
    pro = (idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k)
    for tile in range(pid, n_rows * CHUNKS, nprog):
        row = tile // CHUNKS
        cols = (tile % CHUNKS) * BLOCK_H + lane
        mask = cols < H
        v = moe_finalize_row(x_ptr, pro, row, row < n_rows, cols, mask, H, EPI, SLOTS)
        tl.store(out_ptr + tl.cast(row, tl.int64) * H + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


_EPILOGUE = Launcher(sys.modules[__name__], "rmsnorm_epilogue_kernel", ArgKey.of(rmsnorm_epilogue_kernel))
_PROLOGUE = Launcher(sys.modules[__name__], "moe_finalize_kernel",
                     ArgKey.of(moe_finalize_kernel, ints=("guard_ptr",)))


def moe_finalize(call, spec, guard_ptr: int, out: torch.Tensor, launch: MoeLaunch = None) -> None:
    """Write this rank's MoE finalize rows (``call.num_tokens`` x hidden, input dtype) into ``out``; an index
    outside ``[0, P)`` adds nothing and is recorded at ``guard_ptr``. ``launch`` overrides ``moe_launch``'s choice
    (benchmarks). Graph-safe."""
    n, hidden = call.num_tokens, call.x.shape[1]
    launch = launch or moe_launch(hidden, n, out.dtype, out.get_device())
    _PROLOGUE.launch(moe_grid(n, hidden, launch), (call.x, *prologue_args(call, guard_ptr), out, n),
                     {"H": hidden, "BLOCK_H": launch.block_h, "SLOTS": launch.slots, "EPI": spec.code},
                     {"num_warps": launch.num_warps})


def rmsnorm_epilogue(summed: torch.Tensor, call, spec, launch: EpilogueLaunch = None) -> None:
    """Launch the epilogue of ``spec`` over ``summed`` (tokens, hidden, the allreduced sum) into ``call``'s
    outputs. ``launch`` overrides ``epilogue_launch``'s choice (benchmarks). Graph-safe (no allocation, no sync)."""
    n, hidden = summed.shape
    launch = launch or epilogue_launch(hidden, n, summed.dtype, summed.get_device())
    _EPILOGUE.launch(epilogue_grid(n, launch), (summed, *epilogue_args(call, spec), n),
                     {"H": hidden, "BLOCK_H": launch.block_h, "ROWS": launch.rows, "EVICT_FIRST": launch.evict_first,
                      "EPI": spec.code}, {"num_warps": launch.num_warps})
