"""What builds a row of this rank's allreduce input, for every spec: the caller's ``x`` itself, or the MoE finalize
of the token's expert rows (``arfuse.core.math.moe_finalize``)::

    x[t] = (sum_k expert_scales[t, k] * expert_out[idx[t, k]] (+ shared[t])).to(dtype)     # fp32 sum, k in order

An index outside ``[0, P)`` reads nothing and adds nothing; the kernel records it by writing 1 into the
host-mapped int32 at ``guard_ptr`` (an ``IndexGuard``), which ``check_health()`` reports: raising inside one rank's
call would leave its peers waiting in the collective.

``pro`` bundles the prologue arguments in kernel order: ``(idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows,
top_k)`` (``x_ptr`` is ``expert_out``; for specs without the prologue they are unused).

``SLOTS`` expert slots are loaded per step (1, 4 or 8): their index loads, then their row loads, are in flight
together, so a token costs about ``2 * top_k / SLOTS`` dependent memory round trips; the sum adds the slots in
order whatever ``SLOTS`` is, so every value of it gives the same bits.
"""
import triton
import triton.language as tl

from arfuse.kernels._spec import PROLOGUE_MOE, field

# Slots per step where the symmetric-memory kernels build their input rows.
SYMM_SLOTS = tl.constexpr(4)


@triton.jit
def _index(idx_ptr, base, k, top_k, row_ok):
    """Slot ``k``'s expert row index, and whether the slot exists (``k < top_k`` for a real row)."""
    live = row_ok & (k < top_k)
    return tl.load(idx_ptr + base + k, mask=live, other=0), live


@triton.jit
def _expert(x_ptr, esc_ptr, base, k, i, live, n_expert_rows, cols, mask, H: tl.constexpr):
    """Slot ``k``'s expert row (index ``i``) over ``cols`` and its weight, as fp32, and whether the index is out
    of range; a slot that does not exist or whose index is out of range reads nothing (row and weight 0)."""
    bad = live & ((i < 0) | (i >= n_expert_rows))
    take = live & (i >= 0) & (i < n_expert_rows)
    weight = tl.load(esc_ptr + base + k, mask=take, other=0.0).to(tl.float32)
    v = tl.load(x_ptr + i.to(tl.int64) * H + cols, mask=mask & take, other=0.0).to(tl.float32)
    return v, weight, bad


@triton.jit
def _four_indices(idx_ptr, base, k, top_k, row_ok):
    """Slots ``k .. k + 3``'s indices and whether each slot exists."""
    i0, l0 = _index(idx_ptr, base, k, top_k, row_ok)
    i1, l1 = _index(idx_ptr, base, k + 1, top_k, row_ok)
    i2, l2 = _index(idx_ptr, base, k + 2, top_k, row_ok)
    i3, l3 = _index(idx_ptr, base, k + 3, top_k, row_ok)
    return i0, i1, i2, i3, l0, l1, l2, l3


@triton.jit
def _four_experts(x_ptr, esc_ptr, base, k, i0, i1, i2, i3, l0, l1, l2, l3, n_expert_rows, cols, mask,
                  H: tl.constexpr):
    """Slots ``k .. k + 3``'s rows and weights, and whether any of their indices is out of range."""
    v0, w0, b0 = _expert(x_ptr, esc_ptr, base, k, i0, l0, n_expert_rows, cols, mask, H)
    v1, w1, b1 = _expert(x_ptr, esc_ptr, base, k + 1, i1, l1, n_expert_rows, cols, mask, H)
    v2, w2, b2 = _expert(x_ptr, esc_ptr, base, k + 2, i2, l2, n_expert_rows, cols, mask, H)
    v3, w3, b3 = _expert(x_ptr, esc_ptr, base, k + 3, i3, l3, n_expert_rows, cols, mask, H)
    return v0, v1, v2, v3, w0, w1, w2, w3, b0 | b1 | b2 | b3


@triton.jit
def _add_four(acc, v0, v1, v2, v3, w0, w1, w2, w3):
    acc += v0 * w0
    acc += v1 * w1
    acc += v2 * w2
    acc += v3 * w3
    return acc


@triton.jit
def moe_finalize_row(x_ptr, pro, row, row_ok, cols, mask, H: tl.constexpr, EPI: tl.constexpr,
                     SLOTS: tl.constexpr):
    """Token ``row``'s finalized expert sum over columns ``cols`` as fp32 (zeros where ``row_ok`` is false)."""
    idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k = pro
    if field(EPI, "shared_expert"):  # in flight with the expert rows; added last
        shared = tl.load(shared_ptr + tl.cast(row, tl.int64) * H + cols, mask=mask & row_ok, other=0.0)
    acc = cols.to(tl.float32) * 0.0
    base = tl.cast(row, tl.int64) * top_k
    bad = row_ok & (top_k < 0)  # False, typed like row_ok
    for k in range(0, top_k, SLOTS):
        if SLOTS == 1:
            i, live = _index(idx_ptr, base, k, top_k, row_ok)
            v, w, b = _expert(x_ptr, esc_ptr, base, k, i, live, n_expert_rows, cols, mask, H)
            acc += v * w
            bad = bad | b
        else:  # every index load of the step first: a GPU issues in order, and a row load waiting for its
            # index would hold back the loads of the slots after it
            i0, i1, i2, i3, l0, l1, l2, l3 = _four_indices(idx_ptr, base, k, top_k, row_ok)
            if SLOTS == 8:
                i4, i5, i6, i7, l4, l5, l6, l7 = _four_indices(idx_ptr, base, k + 4, top_k, row_ok)
            v0, v1, v2, v3, w0, w1, w2, w3, b = _four_experts(x_ptr, esc_ptr, base, k, i0, i1, i2, i3, l0, l1, l2,
                                                              l3, n_expert_rows, cols, mask, H)
            if SLOTS == 8:
                v4, v5, v6, v7, w4, w5, w6, w7, b2 = _four_experts(x_ptr, esc_ptr, base, k + 4, i4, i5, i6, i7, l4,
                                                                   l5, l6, l7, n_expert_rows, cols, mask, H)
                b = b | b2
            acc = _add_four(acc, v0, v1, v2, v3, w0, w1, w2, w3)
            if SLOTS == 8:
                acc = _add_four(acc, v4, v5, v6, v7, w4, w5, w6, w7)
            bad = bad | b
    tl.store(guard_ptr.to(tl.pointer_type(tl.int32)), 1, mask=bad)
    if field(EPI, "shared_expert"):
        acc += shared.to(tl.float32)
    return acc


@triton.jit
def input_row(x_ptr, pro, row, row_ok, cols, mask, H: tl.constexpr, EPI: tl.constexpr):
    """Row ``row`` of this rank's allreduce input over columns ``cols``, in the input dtype (masked: 0)."""
    if field(EPI, "prologue") == PROLOGUE_MOE:
        v = moe_finalize_row(x_ptr, pro, row, row_ok, cols, mask, H, EPI, SYMM_SLOTS)
        v = v.to(x_ptr.dtype.element_ty)
    else:
        v = tl.load(x_ptr + tl.cast(row, tl.int64) * H + cols, mask=mask, other=0.0)
    return v
