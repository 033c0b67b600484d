"""The fused epilogue every allreduce kernel ends with, for every :class:`~arfuse.core.spec.FusionSpec` (its
``code`` as the constexpr ``EPI``, decoded by ``_spec.field``). The semantics are ``arfuse.core.math.epilogue``;
for the fp32 allreduced sum ``acc``::

    s = acc + residual.float(); residual_out = s.to(dtype)                          # residual
    y = s * rsqrt(mean(s * s) + eps) * (weight.float() + weight_offset)              # norm (offset if set)
    out = y.to(dtype)                                                                # no quantization, or:
    out = fp8(clamp(y / scale, -448, 448)), norm_out = y.to(dtype) if also_norm      # scale by kind:
        static: the caller's; per token: max(amax(|y|) / 448, 1 / (512 * 448)), written as fp32;
        per group of G columns: max(amax / 448, 1e-10), fp32 or rounded up to a power of 2 and packed as UE8M0
    out = acc.to(dtype)                                                              # plain allreduce

A tile is one row (``acc`` of shape (BLOCK_H,), ``rows`` a scalar: the symmetric-memory kernels) or ROWS rows
((ROWS, BLOCK_H), ``rows`` of shape (ROWS,): the NCCL path); ``offs``/``mask`` have the tile's shape (masked
columns of ``acc`` and ``w`` hold 0), ``row_ok`` the rows' shape. Every reduction is along the row, so for one
row the order is the one the row's layout gives (the two-shot kernels rely on it being equal at every call site).

``outs`` bundles the output arguments in kernel order: ``(out_ptr, res_out_ptr, norm_ptr, scale_ptr,
scale_out_ptr, scale_row_stride, scale_col_stride)``.
"""
import triton
import triton.language as tl

from arfuse.kernels._spec import (FP8_MAX, GROUP_FLOOR, LAYOUT_UE8M0, PER_TOKEN_FLOOR, QUANT_GROUP, QUANT_NONE,
                                  QUANT_PER_TOKEN, QUANT_STATIC, field)


@triton.jit
def load_weight(w_ptr, cols, mask, weight_offset, EPI: tl.constexpr, POLICY: tl.constexpr = tl.constexpr("")):
    """The norm weight as fp32, plus the offset for specs that have one (zeros without a norm); ``POLICY``: the
    load's cache eviction policy."""
    if field(EPI, "norm"):
        w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
        if field(EPI, "weight_offset"):
            w = tl.where(mask, w + weight_offset, 0.0)
    else:
        w = cols.to(tl.float32) * 0.0
    return w


@triton.jit
def load_residual(res_ptr, offs, mask, EPI: tl.constexpr, POLICY: tl.constexpr = tl.constexpr("")):
    """A residual tile as fp32 (zeros for specs without a residual); ``POLICY``: the load's cache eviction policy."""
    if field(EPI, "residual"):
        res = tl.load(res_ptr + offs, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
    else:
        res = offs.to(tl.float32) * 0.0
    return res


@triton.jit
def _row_reduce_sum(x):
    """Per-row sum: a scalar for a row, (ROWS, 1) for a tile."""
    if len(x.shape) == 1:
        r = tl.sum(x, axis=0)
    else:
        r = tl.sum(x, axis=1, keep_dims=True)
    return r


@triton.jit
def _row_reduce_max(x):
    if len(x.shape) == 1:
        r = tl.max(x, axis=0)
    else:
        r = tl.max(x, axis=1, keep_dims=True)
    return r


@triton.jit
def round_up_pow2(scale):
    """Positive normal fp32 values rounded up to a power of two (``arfuse.core.math.round_up_pow2``)."""
    bits = scale.to(tl.int32, bitcast=True)
    up = tl.where((bits & 0x7FFFFF) != 0, (bits + 0x800000) & 0x7F800000, bits)
    return up.to(tl.float32, bitcast=True)


@triton.jit
def _store_ue8m0(scale, gid, rows, row_ok, scale_out_ptr, row_stride, col_stride, NG: tl.constexpr):
    """Pack power-of-two scales (..., NGB) as UE8M0 (group 4j + b in byte b of word j; groups >= NG give 0 bytes)
    and store the words that hold real groups."""
    NGB: tl.constexpr = gid.shape[0]
    exps = tl.where(gid < NG, (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF, 0)
    if NGB >= 4:
        shifts = (tl.arange(0, 4) * 8)
        words = tl.arange(0, NGB // 4)
        if len(scale.shape) == 1:
            packed = tl.sum(tl.reshape(exps, (NGB // 4, 4)) << shifts[None, :], axis=1)
            ptrs = scale_out_ptr + rows * row_stride + words * col_stride
            tl.store(ptrs, packed, mask=(words < (NG + 3) // 4) & row_ok)
        else:
            packed = tl.sum(tl.reshape(exps, (scale.shape[0], NGB // 4, 4)) << shifts[None, None, :], axis=2)
            ptrs = scale_out_ptr + rows[:, None] * row_stride + words[None, :] * col_stride
            tl.store(ptrs, packed, mask=(words < (NG + 3) // 4)[None, :] & row_ok[:, None])
    else:
        if len(scale.shape) == 1:
            packed = tl.sum(exps << (gid * 8), axis=0)
        else:
            packed = tl.sum(exps << (gid * 8)[None, :], axis=1)
        tl.store(scale_out_ptr + rows * row_stride, packed, mask=row_ok)


@triton.jit
def quantize_groups(y, rows, row_ok, scale_out_ptr, row_stride, col_stride, H: tl.constexpr, EPI: tl.constexpr):
    """``y / scale`` per group of G columns (G a power of two dividing H), writing the scales."""
    G: tl.constexpr = field(EPI, "group_size")
    NGB: tl.constexpr = y.shape[len(y.shape) - 1] // G
    gid = tl.arange(0, NGB)
    if len(y.shape) == 1:
        y3 = tl.reshape(y, (NGB, G))
        scale = tl.maximum(tl.max(tl.abs(y3), axis=1) / FP8_MAX, GROUP_FLOOR)
    else:
        y3 = tl.reshape(y, (y.shape[0], NGB, G))
        scale = tl.maximum(tl.max(tl.abs(y3), axis=2) / FP8_MAX, GROUP_FLOOR)
    if field(EPI, "scale_layout") == LAYOUT_UE8M0:
        scale = round_up_pow2(scale)
        _store_ue8m0(scale, gid, rows, row_ok, scale_out_ptr, row_stride, col_stride, H // G)
    elif len(y.shape) == 1:
        tl.store(scale_out_ptr + rows * row_stride + gid * col_stride, scale, mask=(gid < H // G) & row_ok)
    else:
        ptrs = scale_out_ptr + rows[:, None] * row_stride + gid[None, :] * col_stride
        tl.store(ptrs, scale, mask=(gid < H // G)[None, :] & row_ok[:, None])
    if len(y.shape) == 1:
        q = tl.reshape(y3 / scale[:, None], y.shape)
    else:
        q = tl.reshape(y3 / scale[:, :, None], y.shape)
    return q


@triton.jit
def finish_row(acc, res, w, offs, mask, rows, row_ok, outs, eps, H: tl.constexpr, EPI: tl.constexpr):
    """Write one tile's outputs from its fp32 sum ``acc`` and the preloaded residual tile and weight."""
    out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, row_stride, col_stride = outs
    if not field(EPI, "norm"):
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if field(EPI, "residual"):
            acc += res
            tl.store(res_out_ptr + offs, acc.to(res_out_ptr.dtype.element_ty), mask=mask)
        mean_sq = _row_reduce_sum(acc * acc) / H
        y = acc * (1.0 / tl.sqrt(mean_sq + eps)) * w
        QUANT: tl.constexpr = field(EPI, "quant")
        if QUANT != QUANT_NONE and field(EPI, "also_norm"):
            tl.store(norm_ptr + offs, y.to(norm_ptr.dtype.element_ty), mask=mask)
        if QUANT == QUANT_STATIC:
            y = tl.clamp(y / tl.load(scale_ptr), -FP8_MAX, FP8_MAX)
        elif QUANT == QUANT_PER_TOKEN:
            scale = tl.maximum(_row_reduce_max(tl.abs(y)) / FP8_MAX, PER_TOKEN_FLOOR)
            if len(y.shape) == 1:
                tl.store(scale_out_ptr + rows * row_stride, scale, mask=row_ok)
            else:
                tl.store(scale_out_ptr + rows[:, None] * row_stride, scale, mask=row_ok[:, None])
            y = tl.clamp(y / scale, -FP8_MAX, FP8_MAX)
        elif QUANT == QUANT_GROUP:
            y = tl.clamp(quantize_groups(y, rows, row_ok, scale_out_ptr, row_stride, col_stride, H, EPI),
                         -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_row(acc, offs, mask, cols, rows, row_ok, res_ptr, w_ptr, weight_offset, outs, eps, H: tl.constexpr,
              EPI: tl.constexpr):
    """``finish_row`` that loads the residual tile and the weight itself."""
    res = load_residual(res_ptr, offs, mask, EPI)
    w = load_weight(w_ptr, cols, cols < H, weight_offset, EPI)
    finish_row(acc, res, w, offs, mask, rows, row_ok, outs, eps, H, EPI)
