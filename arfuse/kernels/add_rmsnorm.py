"""Fused residual add + RMSNorm (+ FP8) on an already-allreduced tensor: the epilogue of the NCCL path.

Equivalent torch::

    s = summed.float() + residual.float(); residual_out = s.to(dtype)
    out = (s * rsqrt(mean(s * s) + eps) * weight.float()).to(dtype)   # or FP8 with scale

One kernel instead of three, so "NCCL all_reduce + this" is the best unfused path (and the multi-node path).
"""
import torch
import triton
import triton.language as tl

from arfuse.kernels._epilogue import store_row
from arfuse.kernels.launch_config import block_config, grid_size


@triton.jit(do_not_specialize=["n_rows", "eps"])
def add_rmsnorm_kernel(sum_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, n_rows, eps,
                       H: tl.constexpr, BLOCK_H: tl.constexpr, PATTERN: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    for row in range(pid, n_rows, nprog):
        offs = row.to(tl.int64) * H + cols
        acc = tl.load(sum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        store_row(acc, row, cols, mask, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, eps, H, PATTERN)


def add_rmsnorm(summed: torch.Tensor, residual, weight: torch.Tensor, eps: float, scale, out: torch.Tensor,
                residual_out, pattern: int) -> None:
    """Launch the epilogue over ``summed`` (tokens, hidden); ``residual`` None for the no-residual pattern.
    Graph-safe (no allocation, no host sync)."""
    n, hidden = summed.shape
    block_h, num_warps = block_config(hidden)
    add_rmsnorm_kernel[(grid_size(n),)](summed, residual, weight, out, residual_out, scale, n, eps,
                                        H=hidden, BLOCK_H=block_h, PATTERN=pattern, num_warps=num_warps)
