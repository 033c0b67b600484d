"""One-shot allreduce + epilogue over symmetric memory: every rank reads every peer's rows.

Equivalent torch (``x``: this rank's input, or the MoE finalize of its expert rows: ``_prologue``)::

    x = prologue(call)
    dist.all_reduce(x)                  # summed in fp32, peers in rank order 0..WS-1
    epilogue(spec, x, call)             # every FusionSpec: see _epilogue

Each block copies its rows of ``x`` into this rank's symmetric buffer, meets the same block id on every peer
(one barrier), then sums the peers' copies of those rows in a fixed rank order, so every rank's result is bitwise
identical. The copy-in buffer alternates between two halves by a device-side call counter, so no closing
barrier is needed: a peer can only overwrite a half after a later collective proved everyone finished reading
it. With ``COPY_IN=False`` the input already sits in the zero-copy region, which has no second half, so a closing
barrier protects it instead.
"""
import sys

import triton
import triton.language as tl

from arfuse.kernels._epilogue import finish_row, load_residual, load_weight
from arfuse.kernels._prologue import input_row
from arfuse.kernels._sync import OP_ONE_SHOT, block_barrier, bump_epoch, load_epoch, peer_base
from arfuse.kernels._launch import SYMM_INTS, ArgKey, Launcher
from arfuse.kernels.launch_config import RUNTIME_ARGS, block_config, epilogue_args, grid_size, prologue_args


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def one_shot_kernel(P0, P1, P2, P3, P4, P5, P6, P7, S0, S1, S2, S3, S4, S5, S6, S7, gen_ptr, err_ptr, state_ptr,
                    x_ptr, idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k, res_ptr, w_ptr, out_ptr,
                    res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride, eps,
                    weight_offset, n_rows, timeout_ns, region_off, half_stride, RANK: tl.constexpr,
                    WS: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr, EPI: tl.constexpr,
                    COPY_IN: tl.constexpr, NTHREADS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype = x_ptr.dtype.element_ty
    gen = tl.load(gen_ptr + pid, volatile=True)
    pro = (idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k)
    outs = (out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride)
    offset = region_off
    if COPY_IN:
        epoch = load_epoch(state_ptr)
        offset += (epoch % 2) * half_stride
        bump_epoch(state_ptr, epoch)
        own = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, dtype, offset)
        for row in range(pid, n_rows, nprog):
            offs = row.to(tl.int64) * H + cols
            tl.store(own + offs, input_row(x_ptr, pro, row, row < n_rows, cols, mask, H, EPI), mask=mask)
    w = load_weight(w_ptr, cols, mask, weight_offset, EPI)
    ok = block_barrier(S0, S1, S2, S3, S4, S5, S6, S7, pid, gen + 1, err_ptr, timeout_ns, RANK, WS, NTHREADS,
                       OP_ONE_SHOT)
    if ok:
        for row in range(pid, n_rows, nprog):
            offs = row.to(tl.int64) * H + cols
            res = load_residual(res_ptr, offs, mask, EPI)
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for p in tl.static_range(WS):
                peer = peer_base(p, P0, P1, P2, P3, P4, P5, P6, P7, dtype, offset)
                acc += tl.load(peer + offs, mask=mask, other=0.0).to(tl.float32)
            finish_row(acc, res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)
    if COPY_IN:
        tl.store(gen_ptr + pid, gen + 1)
    else:
        block_barrier(S0, S1, S2, S3, S4, S5, S6, S7, pid, gen + 2, err_ptr, timeout_ns, RANK, WS, NTHREADS,
                      OP_ONE_SHOT)
        tl.store(gen_ptr + pid, gen + 2)


_ONE_SHOT = Launcher(sys.modules[__name__], "one_shot_kernel", ArgKey.of(one_shot_kernel, ints=SYMM_INTS))


def one_shot(a, call, spec, copy_in: bool) -> None:
    """Launch the one-shot kernel for ``call`` (a ``FusedCall`` of ``spec``) with workspace args ``a`` (a
    ``SymmArgs``); ``copy_in=False``: ``call.x`` is the zero-copy buffer (never with the MoE prologue, whose rows
    are built in the copy-in). Collective over the workspace's ranks; graph-safe."""
    if spec.moe and not copy_in:
        raise ValueError("one_shot: the MoE prologue builds its rows in the copy-in; copy_in must be True")
    n, hidden = call.num_tokens, call.x.shape[1]
    block_h, num_warps = block_config(hidden)
    _ONE_SHOT.launch(
        grid_size(n, min(a.max_grid, a.barrier_slots)),
        (*a.peer_ptrs, *a.pad_ptrs, a.barrier_gen, a.err_ptr, a.one_shot_state, call.x,
         *prologue_args(call, a.guard_ptr), *epilogue_args(call, spec), n, a.timeout_ns,
         a.one_shot_off if copy_in else a.zero_copy_off, a.one_shot_half),
        {"RANK": a.rank, "WS": a.world_size, "H": hidden, "BLOCK_H": block_h, "EPI": spec.code, "COPY_IN": copy_in,
         "NTHREADS": 32 * num_warps}, {"num_warps": num_warps})
