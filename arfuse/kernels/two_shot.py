"""Two-shot allreduce + epilogue over symmetric memory, token-partitioned and push-based, in one kernel.

Equivalent torch (``x``: this rank's input, or the MoE finalize of its expert rows: ``_prologue``)::

    x = prologue(call)
    dist.all_reduce(x)                  # reduce-scatter by token chunks, then all-gather of the sums
    epilogue(spec, x, call)             # every FusionSpec: see _epilogue

Tokens are split into ``WS`` contiguous chunks; rank ``c`` owns chunk ``c``. Within every chunk, row ``j`` belongs
to block ``j % nprog`` on every rank, so block-level barriers suffice. Every remote access is a write (NVLink
writes are posted; reads need a round trip), and ``x`` is read in place (no copy-in):
  1. push: block ``b`` writes its rows of every other chunk into slot ``RANK`` of that chunk owner's buffer;
  2. barrier; reduce: block ``b`` sums its rows of this rank's chunk (own ``x`` + the peers' slots, fp32, rank
     order), rounds to the input dtype, writes the sums into every peer's gather buffer and runs its own rows'
     epilogue right away (from the rounded sums, as the peers will);
  3. barrier; block ``b`` runs the epilogue for its rows of the other chunks from its local gather buffer.
The all-gather moves the sums, not the outputs: half the bytes, and correct even if residuals differed by rank.
Every rank finishes from the same rounded sums, so outputs are bitwise identical; the epilogue is inlined at two
call sites (own rows, gathered rows), so FMA contraction is off to make both round the same way. No closing barrier: a rank's
slots and gather rows are written again only in a later launch, after a barrier that proves it finished reading.
"""
import sys

import triton
import triton.language as tl

from arfuse.kernels._epilogue import finish_row, load_residual, load_weight
from arfuse.kernels._prologue import input_row
from arfuse.kernels._sync import OP_TWO_SHOT, block_barrier, peer_base
from arfuse.kernels._launch import SYMM_INTS, ArgKey, Launcher
from arfuse.kernels.launch_config import RUNTIME_ARGS, block_config, epilogue_args, grid_size, prologue_args


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def two_shot_kernel(P0, P1, P2, P3, P4, P5, P6, P7, S0, S1, S2, S3, S4, S5, S6, S7, gen_ptr, err_ptr, x_ptr,
                    idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k, res_ptr, w_ptr, out_ptr,
                    res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride, eps,
                    weight_offset, n_rows, timeout_ns, rs_off, rs_slot, gather_off, RANK: tl.constexpr,
                    WS: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr, EPI: tl.constexpr,
                    NTHREADS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype = x_ptr.dtype.element_ty
    chunk = tl.cdiv(n_rows, WS)
    gen = tl.load(gen_ptr + pid, volatile=True)
    pro = (idx_ptr, esc_ptr, shared_ptr, guard_ptr, n_expert_rows, top_k)
    outs = (out_ptr, res_out_ptr, norm_ptr, scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride)

    for c in tl.static_range(WS):
        if c != RANK:
            slot = peer_base(c, P0, P1, P2, P3, P4, P5, P6, P7, dtype, rs_off + RANK * rs_slot)
            for j in range(pid, chunk, nprog):
                row = c * chunk + j
                m = mask & (row < n_rows)
                tl.store(slot + j * H + cols, input_row(x_ptr, pro, row, row < n_rows, cols, m, H, EPI), mask=m)
    w = load_weight(w_ptr, cols, mask, weight_offset, EPI)
    ok = block_barrier(S0, S1, S2, S3, S4, S5, S6, S7, pid, gen + 1, err_ptr, timeout_ns, RANK, WS, NTHREADS,
                       OP_TWO_SHOT)
    if ok:
        own_slots = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, dtype, rs_off)
        for j in range(pid, chunk, nprog):
            row = RANK * chunk + j
            if row < n_rows:
                offs = row.to(tl.int64) * H + cols
                res = load_residual(res_ptr, offs, mask, EPI)
                acc = tl.zeros([BLOCK_H], dtype=tl.float32)
                for s in tl.static_range(WS):
                    if s == RANK:
                        acc += input_row(x_ptr, pro, row, row < n_rows, cols, mask, H, EPI).to(tl.float32)
                    else:
                        acc += tl.load(own_slots + s * rs_slot + j * H + cols, mask=mask, other=0.0).to(tl.float32)
                summed = acc.to(dtype)
                for p in tl.static_range(WS):
                    if p != RANK:
                        peer = peer_base(p, P0, P1, P2, P3, P4, P5, P6, P7, dtype, gather_off)
                        tl.store(peer + offs, summed, mask=mask)
                finish_row(summed.to(tl.float32), res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)
        ok = block_barrier(S0, S1, S2, S3, S4, S5, S6, S7, pid, gen + 2, err_ptr, timeout_ns, RANK, WS, NTHREADS,
                           OP_TWO_SHOT)
        if ok:
            gathered = peer_base(RANK, P0, P1, P2, P3, P4, P5, P6, P7, dtype, gather_off)
            for c in tl.static_range(WS):
                if c != RANK:
                    for j in range(pid, chunk, nprog):
                        row = c * chunk + j
                        if row < n_rows:
                            offs = row.to(tl.int64) * H + cols
                            res = load_residual(res_ptr, offs, mask, EPI)
                            acc = tl.load(gathered + offs, mask=mask, other=0.0).to(tl.float32)
                            finish_row(acc, res, w, offs, mask, row, row < n_rows, outs, eps, H, EPI)
    tl.store(gen_ptr + pid, gen + 2)


_TWO_SHOT = Launcher(sys.modules[__name__], "two_shot_kernel", ArgKey.of(two_shot_kernel, ints=SYMM_INTS))


def two_shot(a, call, spec) -> None:
    """Launch the two-shot kernel for ``call`` (a ``FusedCall`` of ``spec``) with workspace args ``a`` (a
    ``SymmArgs``). Collective over the workspace's ranks; graph-safe."""
    n, hidden = call.num_tokens, call.x.shape[1]
    block_h, num_warps = block_config(hidden)
    chunk = -(-n // a.world_size)
    _TWO_SHOT.launch(
        grid_size(chunk, min(a.max_grid, a.barrier_slots)),
        (*a.peer_ptrs, *a.pad_ptrs, a.barrier_gen, a.err_ptr, call.x, *prologue_args(call, a.guard_ptr),
         *epilogue_args(call, spec), n, a.timeout_ns, a.two_shot_off, a.two_shot_slot, a.gather_off),
        {"RANK": a.rank, "WS": a.world_size, "H": hidden, "BLOCK_H": block_h, "EPI": spec.code,
         "NTHREADS": 32 * num_warps}, {"num_warps": num_warps, "enable_fp_fusion": False})
