"""Barrier-free two-shot allreduce + epilogue (Lamport reduce-scatter and all-gather) for mid and large sizes.

Equivalent torch (``x``: this rank's input, or the MoE finalize of its expert rows: ``_prologue``)::

    x = prologue(call)
    dist.all_reduce(x)                  # reduce-scatter by token chunks, then all-gather of the sums
    epilogue(spec, x, call)             # every FusionSpec: see _epilogue

Tokens are split into ``WS`` contiguous chunks; rank ``c`` owns chunk ``c``; row ``j`` of every chunk belongs to
block ``j % nprog`` on every rank. All remote accesses are posted writes into sentinel-filled buffers, and all
waits are polls on local memory, so nothing waits at a barrier and each row's epilogue starts as soon as its sum
arrives (overlapping the traffic of other rows):
  1. block ``b`` pushes its rows of every other chunk into slot ``RANK`` of that owner's reduce buffer;
  2. for its rows of this rank's chunk it polls the peers' slots, sums them with its own ``x`` (fp32), rounds to
     the input dtype, pushes the sums into every peer's gather buffer and runs the epilogue at once;
  3. for its rows of the other chunks it polls its own gather buffer and runs the epilogue.
Consumed rows are reset to the sentinel. An owner that timed out waiting for a peer's rows pushes no sums for them
(its peers then time out on that chunk instead of finishing from a wrong sum), and a rank records such a
gather-phase timeout (naming the chunk's owner) only if it recorded none before: a rank that waited for rows of its
own chunk names the peer that did not send them. Buffers alternate by a device-side call counter; a rank can be
two calls ahead only after every rank finished the older call (each call needs every rank's contribution to
chunk 0).
Every rank finishes from the same rounded sums, so outputs are bitwise identical; the epilogue is inlined at two
call sites (own rows, gathered rows), so FMA contraction is off and both must reduce the row's mean square over
the same thread split (Triton chose another one for the owner's rows under the FP8 epilogue: those rows now take
the gathered rows' layout, see :func:`gathered_layout`; checked in tests/unit/test_kernels_compile.py).
"""
import sys

import triton
import triton.language as tl

from arfuse.kernels._epilogue import finish_row, load_residual, load_weight
from arfuse.kernels._prologue import input_row
from arfuse.kernels._spec import QUANT_NONE, field
from arfuse.kernels._sync import (OP_LAMPORT_TWO_SHOT, bump_epoch, first_missing_slot, globaltimer, load_epoch,
                                  no_negative_zero, peer_base, poll, record_error, sentinel_of)
from arfuse.kernels._launch import SYMM_INTS, ArgKey, Launcher
from arfuse.kernels.launch_config import (RUNTIME_ARGS, block_config, epilogue_args, grid_size,
                                          next_power_of_2, prologue_args)


@triton.jit
def record_if_first(err_ptr, peer, OP: tl.constexpr, RANK: tl.constexpr):
    """``record_error`` unless this rank already recorded one."""
    if tl.load(err_ptr.to(tl.pointer_type(tl.int32)), volatile=True) == 0:
        record_error(err_ptr, peer, OP, RANK)


@triton.jit
def gathered_layout(summed, slot_bits, mask, sentinel, dtype: tl.constexpr, bits_ty: tl.constexpr):
    """``summed`` (a row of this rank's chunk) as float32 in the register layout of a row read from the gather
    buffer: through this rank's own, otherwise unused, gather slot of the row, reset to the sentinel afterwards.

    The epilogue's mean-square reduction sums in the order its input's layout gives; for the FP8 epilogue Triton
    lays the owner's sum (from a 2-D reduction) out differently from a gathered row (a 1-D load), so the owner's
    rows came out a few bits different from the peers' (bench/NOTES.md). A round trip makes the layouts equal.
    """
    tl.store(slot_bits, summed.to(bits_ty, bitcast=True), mask=mask)
    tl.debug_barrier()
    bits = tl.load(slot_bits, mask=mask, other=0, volatile=True)
    tl.debug_barrier()
    tl.store(slot_bits, tl.full(bits.shape, sentinel, bits.dtype), mask=mask)
    return bits.to(dtype, bitcast=True).to(tl.float32)


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def lamport_two_shot_kernel(P0, P1, P2, P3, P4, P5, P6, P7, err_ptr, state_ptr, x_ptr, idx_ptr, esc_ptr, shared_ptr,
                            guard_ptr, n_expert_rows, top_k, res_ptr, w_ptr, out_ptr, res_out_ptr, norm_ptr,
                            scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride, eps, weight_offset,
                            n_rows, timeout_ns, rs_off, rs_slot, rs_buffer, gather_off, gather_buffer,
                            RANK: tl.constexpr, WS: tl.constexpr, WS_P2: tl.constexpr, H: tl.constexpr,
                            BLOCK_H: tl.constexpr, EPI: tl.constexpr, BITS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype = x_ptr.dtype.element_ty
    bits_ty = tl.int16 if BITS == 16 else tl.int32
    sentinel = sentinel_of(BITS)
    chunk = tl.cdiv(n_rows, WS)
    epoch = load_epoch(state_ptr)
    rs_base = rs_off + (epoch % 2) * rs_buffer
    g_base = gather_off + (epoch % 2) * gather_buffer
    pro = (idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k)
    outs = (out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride)

    for c in tl.static_range(WS):
        if c != RANK:
            slot = peer_base(c, P0, P1, P2, P3, P4, P5, P6, P7, dtype, rs_base + RANK * rs_slot)
            for j in range(pid, chunk, nprog):
                row = c * chunk + j
                m = mask & (row < n_rows)
                v = no_negative_zero(input_row(x_ptr, pro, row, row < n_rows, cols, m, H, EPI))
                tl.store(slot + j * H + cols, v, mask=m)
    bump_epoch(state_ptr, epoch)

    w = load_weight(w_ptr, cols, mask, weight_offset, EPI)
    start = globaltimer()
    own_slots = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, bits_ty, rs_base)
    slots = tl.arange(0, WS_P2)
    slot_rows = slots.to(tl.int64)[:, None] * rs_slot
    mask2 = ((slots < WS) & (slots != RANK))[:, None] & mask[None, :]
    for j in range(pid, chunk, nprog):
        row = RANK * chunk + j
        if row < n_rows:
            offs = row.to(tl.int64) * H + cols
            res = load_residual(res_ptr, offs, mask, EPI)
            mine = input_row(x_ptr, pro, row, row < n_rows, cols, mask, H, EPI).to(tl.float32)
            ptrs = own_slots + slot_rows + (j * H + cols)[None, :]
            bits, ok = poll(ptrs, mask2, sentinel, start, timeout_ns)
            if ok == 0:
                missing = first_missing_slot(bits, mask2, sentinel, slots, WS_P2)
                record_error(err_ptr, missing, OP_LAMPORT_TWO_SHOT, RANK)
            summed = tl.sum(bits.to(dtype, bitcast=True).to(tl.float32), axis=0) + mine
            tl.store(ptrs, tl.full([WS_P2, BLOCK_H], sentinel, bits_ty), mask=mask2)
            summed = no_negative_zero(summed.to(dtype))
            if ok != 0:
                for p in tl.static_range(WS):
                    if p != RANK:
                        peer = peer_base(p, P0, P1, P2, P3, P4, P5, P6, P7, dtype, g_base)
                        tl.store(peer + offs, summed, mask=mask)
            if field(EPI, "quant") != QUANT_NONE:
                own_gather = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, bits_ty, g_base)
                acc = gathered_layout(summed, own_gather + offs, mask, sentinel, dtype, bits_ty)
                if ok != 0:
                    finish_row(acc, res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)
            elif ok != 0:
                finish_row(summed.to(tl.float32), res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)

    gathered = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, bits_ty, g_base)
    for c in tl.static_range(WS):
        if c != RANK:
            for j in range(pid, chunk, nprog):
                row = c * chunk + j
                if row < n_rows:
                    offs = row.to(tl.int64) * H + cols
                    res = load_residual(res_ptr, offs, mask, EPI)
                    bits, ok = poll(gathered + offs, mask, sentinel, start, timeout_ns)
                    if ok == 0:
                        record_if_first(err_ptr, c, OP_LAMPORT_TWO_SHOT, RANK)
                    tl.store(gathered + offs, tl.full([BLOCK_H], sentinel, bits_ty), mask=mask)
                    if ok != 0:
                        acc = bits.to(dtype, bitcast=True).to(tl.float32)
                        finish_row(acc, res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)


_LAMPORT_TWO_SHOT = Launcher(sys.modules[__name__], "lamport_two_shot_kernel",
                             ArgKey.of(lamport_two_shot_kernel, ints=SYMM_INTS))


def lamport_two_shot(a, call, spec) -> None:
    """Launch the barrier-free two-shot kernel for ``call`` (a ``FusedCall`` of ``spec``) with workspace args
    ``a``. Collective over the workspace's ranks; graph-safe."""
    n, hidden = call.num_tokens, call.x.shape[1]
    block_h, num_warps = block_config(hidden)
    chunk = -(-n // a.world_size)
    _LAMPORT_TWO_SHOT.launch(
        grid_size(chunk, a.max_grid),
        (*a.peer_ptrs, a.err_ptr, a.lts_state, call.x, *prologue_args(call, a.guard_ptr), *epilogue_args(call, spec),
         n, a.timeout_ns, a.lts_rs_off, a.two_shot_slot, a.lts_rs_buffer, a.lts_gather_off, a.lts_gather_buffer),
        {"RANK": a.rank, "WS": a.world_size, "WS_P2": next_power_of_2(a.world_size), "H": hidden, "BLOCK_H": block_h,
         "EPI": spec.code, "BITS": 8 * call.x.element_size()}, {"num_warps": num_warps, "enable_fp_fusion": False})
