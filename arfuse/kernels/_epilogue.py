"""The fused epilogue every allreduce kernel ends with: residual add, RMSNorm, optional FP8 quantisation.

Equivalent torch, for one row ``acc`` (the fp32 allreduced sum)::

    s = acc + residual.float()          # PATTERN >= 2
    residual_out = s.to(dtype)
    y = s * rsqrt(mean(s * s) + eps) * weight.float()   # PATTERN >= 1
    out = y.to(dtype)  or  clamp(y / scale, -448, 448).to(float8_e4m3fn)   # PATTERN == 3
    out = acc.to(dtype)                 # PATTERN == 0 (plain allreduce)
"""
import triton
import triton.language as tl

# Pattern codes: the values of arfuse.core.types.Pattern.
ALLREDUCE = tl.constexpr(0)
RMSNORM = tl.constexpr(1)
RESIDUAL_RMSNORM = tl.constexpr(2)
RESIDUAL_RMSNORM_FP8 = tl.constexpr(3)


@triton.jit
def load_weight(w_ptr, cols, mask, PATTERN: tl.constexpr):
    """The RMSNorm weight as fp32 (zeros for the plain allreduce, which has none)."""
    if PATTERN == ALLREDUCE:
        w = cols.to(tl.float32) * 0.0
    else:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def load_residual(res_ptr, row, cols, mask, H: tl.constexpr, PATTERN: tl.constexpr):
    """One residual row as fp32 (zeros for the patterns without a residual)."""
    if PATTERN >= RESIDUAL_RMSNORM:
        res = tl.load(res_ptr + row.to(tl.int64) * H + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        res = cols.to(tl.float32) * 0.0
    return res


@triton.jit
def finish_row(acc, res, w, row, cols, mask, out_ptr, res_out_ptr, scale_ptr, eps, H: tl.constexpr,
               PATTERN: tl.constexpr):
    """Write one output row from its fp32 sum ``acc`` and the preloaded residual row and weight (masked columns
    must hold 0)."""
    offs = row.to(tl.int64) * H + cols
    if PATTERN == ALLREDUCE:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if PATTERN >= RESIDUAL_RMSNORM:
            acc += res
            tl.store(res_out_ptr + offs, acc.to(res_out_ptr.dtype.element_ty), mask=mask)
        mean_sq = tl.sum(acc * acc, axis=0) / H
        y = acc * (1.0 / tl.sqrt(mean_sq + eps)) * w
        if PATTERN == RESIDUAL_RMSNORM_FP8:
            y = tl.clamp(y / tl.load(scale_ptr), -448.0, 448.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_row(acc, row, cols, mask, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, eps,
              H: tl.constexpr, PATTERN: tl.constexpr):
    """``finish_row`` that loads the residual row and the weight itself."""
    res = load_residual(res_ptr, row, cols, mask, H, PATTERN)
    w = load_weight(w_ptr, cols, mask, PATTERN)
    finish_row(acc, res, w, row, cols, mask, out_ptr, res_out_ptr, scale_ptr, eps, H, PATTERN)
