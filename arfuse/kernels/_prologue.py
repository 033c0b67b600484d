"""What builds a row of this rank's allreduce input, for every spec: the caller's ``x`` itself, or the MoE finalize
of the token's expert rows (``arfuse.core.math.moe_finalize``)::

    x[t] = (sum_k expert_scales[t, k] * expert_out[idx[t, k]] (+ shared[t])).to(dtype)     # fp32 sum, k in order

An index outside ``[0, P)`` reads nothing and adds nothing; the kernel records it by writing 1 into the
host-mapped int32 at ``guard_ptr`` (an ``IndexGuard``), which ``check_health()`` reports: raising inside one rank's
call would leave its peers waiting in the collective.

``pro`` bundles the prologue arguments in kernel order: ``(idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows,
top_k)`` (``x_ptr`` is ``expert_out``; for specs without the prologue they are unused).
"""
import triton
import triton.language as tl

from arfuse.kernels._spec import PROLOGUE_MOE, field


@triton.jit
def moe_finalize_row(x_ptr, pro, row, row_ok, cols, mask, H: tl.constexpr, EPI: tl.constexpr):
    """Token ``row``'s finalized expert sum over columns ``cols`` as fp32 (zeros where ``row_ok`` is false)."""
    idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k = pro
    acc = cols.to(tl.float32) * 0.0
    base = tl.cast(row, tl.int64) * top_k
    for k in range(top_k):
        i = tl.load(idx_ptr + base + k, mask=row_ok, other=0)
        bad = row_ok & ((i < 0) | (i >= n_expert_rows))
        tl.store(guard_ptr.to(tl.pointer_type(tl.int32)), 1, mask=bad)
        take = row_ok & (i >= 0) & (i < n_expert_rows)
        weight = tl.load(esc_ptr + base + k, mask=take, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + i.to(tl.int64) * H + cols, mask=mask & take, other=0.0).to(tl.float32)
        acc += v * weight
    if field(EPI, "shared_expert"):
        acc += tl.load(shared_ptr + tl.cast(row, tl.int64) * H + cols, mask=mask & row_ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def input_row(x_ptr, pro, row, row_ok, cols, mask, H: tl.constexpr, EPI: tl.constexpr):
    """Row ``row`` of this rank's allreduce input over columns ``cols``, in the input dtype (masked: 0)."""
    if field(EPI, "prologue") == PROLOGUE_MOE:
        v = moe_finalize_row(x_ptr, pro, row, row_ok, cols, mask, H, EPI).to(x_ptr.dtype.element_ty)
    else:
        v = tl.load(x_ptr + tl.cast(row, tl.int64) * H + cols, mask=mask, other=0.0)
    return v
