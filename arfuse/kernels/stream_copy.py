"""A plain streaming copy: the bandwidth reference of ``arfuse bench --epilogue`` (what this GPU's HBM delivers to a
kernel that only reads and writes, next to torch's own copy)."""
import torch
import triton
import triton.language as tl

BLOCK = 8192


@triton.jit
def stream_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def stream_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)`` for contiguous tensors of one dtype and size."""
    n = src.numel()
    stream_copy_kernel[(triton.cdiv(n, BLOCK),)](src, dst, n, BLOCK=BLOCK, num_warps=8)
