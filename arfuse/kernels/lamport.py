"""Barrier-free one-shot allreduce + epilogue (Lamport style) for the smallest sizes.

Equivalent torch (``x``: this rank's input, or the MoE finalize of its expert rows: ``_prologue``)::

    x = prologue(call)
    dist.all_reduce(x)                  # summed in fp32, the same fixed order on every rank
    epilogue(spec, x, call)             # every FusionSpec: see _epilogue

Every rank pushes its rows into slot ``RANK`` of every peer's buffer (a row's push split into ``SPLIT`` chunks
spread over the grid, so small calls use many SMs' store bandwidth); readers poll all peers' slots of a row at
once until no element is the sentinel (see ``_sync``), sum them, and write the sentinel back. No start or end
barrier. Two buffers alternate by a device-side call counter: a peer writes a buffer again only two calls later,
which it reaches only after this rank's next push, i.e. after this rank's reset was complete. The residual row and
the weight are loaded before polling, and the call counter is bumped before polling, so their latency hides
behind the wait.
"""
import sys

import triton
import triton.language as tl

from arfuse.kernels._epilogue import finish_row, load_residual, load_weight
from arfuse.kernels._prologue import input_row
from arfuse.kernels._sync import (OP_LAMPORT, bump_epoch, first_missing_slot, globaltimer, load_epoch,
                                  no_negative_zero, peer_base, poll, record_error, sentinel_of)
from arfuse.kernels import launch_config
from arfuse.kernels._launch import SYMM_INTS, ArgKey, Launcher
from arfuse.kernels.launch_config import (RUNTIME_ARGS, block_config, epilogue_args, lamport_grid, lamport_push_split,
                                          next_power_of_2, prologue_args)


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def lamport_kernel(P0, P1, P2, P3, P4, P5, P6, P7, err_ptr, state_ptr, x_ptr, idx_ptr, esc_ptr, shared_ptr,
                   guard_ptr, n_expert_rows, top_k, res_ptr, w_ptr, out_ptr, res_out_ptr, norm_ptr, scale_ptr,
                   scale_out_ptr, scale_row_stride, scale_col_stride, eps, weight_offset, n_rows, timeout_ns,
                   region_off, slot_stride, buffer_stride, RANK: tl.constexpr, WS: tl.constexpr,
                   WS_P2: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr,
                   EPI: tl.constexpr, BITS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype = x_ptr.dtype.element_ty
    bits_ty = tl.int16 if BITS == 16 else tl.int32
    sentinel = sentinel_of(BITS)
    epoch = load_epoch(state_ptr)
    base = region_off + (epoch % 2) * buffer_stride
    slot_off = base + RANK * slot_stride
    pro = (idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k)
    outs = (out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride)

    chunk = tl.arange(0, BLOCK_H // SPLIT)
    for item in range(pid, n_rows * SPLIT, nprog):
        ccols = (item % SPLIT) * (BLOCK_H // SPLIT) + chunk
        cmask = ccols < H
        row = item // SPLIT
        offs = row.to(tl.int64) * H + ccols
        v = no_negative_zero(input_row(x_ptr, pro, row, row < n_rows, ccols, cmask, H, EPI))
        for p in tl.static_range(WS):
            tl.store(peer_base(p, P0, P1, P2, P3, P4, P5, P6, P7, dtype, slot_off) + offs, v, mask=cmask)
    bump_epoch(state_ptr, epoch)

    own = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, bits_ty, base)
    slots = tl.arange(0, WS_P2)
    slot_rows = slots.to(tl.int64)[:, None] * slot_stride
    mask2 = (slots < WS)[:, None] & mask[None, :]
    w = load_weight(w_ptr, cols, mask, weight_offset, EPI)
    start = globaltimer()
    for row in range(pid, n_rows, nprog):
        offs = row.to(tl.int64) * H + cols
        res = load_residual(res_ptr, offs, mask, EPI)
        ptrs = own + slot_rows + offs[None, :]
        bits, ok = poll(ptrs, mask2, sentinel, start, timeout_ns)
        if ok == 0:
            record_error(err_ptr, first_missing_slot(bits, mask2, sentinel, slots, WS_P2), OP_LAMPORT, RANK)
        acc = tl.sum(bits.to(dtype, bitcast=True).to(tl.float32), axis=0)
        tl.store(ptrs, tl.full([WS_P2, BLOCK_H], sentinel, bits_ty), mask=mask2)
        if ok != 0:
            finish_row(acc, res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)


_LAMPORT = Launcher(sys.modules[__name__], "lamport_kernel", ArgKey.of(lamport_kernel, ints=SYMM_INTS))


def lamport(a, call, spec) -> None:
    """Launch the barrier-free one-shot kernel for ``call`` (a ``FusedCall`` of ``spec``) with workspace args
    ``a``. Collective over the workspace's ranks; graph-safe."""
    n, hidden = call.num_tokens, call.x.shape[1]
    block_h, num_warps = block_config(hidden)
    num_warps = launch_config.LAMPORT_NUM_WARPS or num_warps
    split = lamport_push_split(n, block_h, a.sms)
    _LAMPORT.launch(
        lamport_grid(n, split, a.sms, a.max_grid),
        (*a.peer_ptrs, a.err_ptr, a.lamport_state, call.x, *prologue_args(call, a.guard_ptr),
         *epilogue_args(call, spec), n, a.timeout_ns, a.lamport_off, a.lamport_slot, a.lamport_buffer),
        {"RANK": a.rank, "WS": a.world_size, "WS_P2": next_power_of_2(a.world_size), "H": hidden, "BLOCK_H": block_h,
         "SPLIT": split, "EPI": spec.code, "BITS": 8 * call.x.element_size()}, {"num_warps": num_warps})
