"""Launch shapes and argument lists shared by the kernels (plain Python: importable without Triton)."""
from typing import Optional

from arfuse.core.spec import Quant

# Ids the kernels write into the error record (must match OP_* in _sync.py).
OP_NAMES = {1: "lamport one-shot", 2: "one-shot", 3: "two-shot", 4: "lamport two-shot"}

# Runtime ints and floats the symmetric-memory kernels never specialise on (token counts, strides, scalars).
RUNTIME_ARGS = ["n_rows", "eps", "weight_offset", "n_expert_rows", "top_k", "scale_row_stride", "scale_col_stride"]

# A CTA handles whole rows; rows beyond the grid are looped over (persistent grid). A rank with its own GPU caps
# its persistent grids here (SymmArgs.max_grid); ranks sharing one GPU take a share of its SMs instead.
MAX_GRID = 528  # 4 CTAs per SM on a 132-SM H100/H200


def next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def block_config(hidden: int):
    """(BLOCK_H, num_warps) for rows of ``hidden`` elements: 16 to 32 elements per thread."""
    block_h = next_power_of_2(hidden)
    num_warps = min(16, max(4, block_h // 512))
    return block_h, num_warps


def grid_size(rows: int, cap: int = MAX_GRID) -> int:
    return max(1, min(rows, cap))


# Lamport push split: a row's push to the peers is spread over up to this many CTAs, in chunks of at least
# PUSH_CHUNK_MIN elements, so one token's traffic does not queue behind one SM's stores. None: the heuristic
# below; an int overrides it (bench/kernel_timing.py sets it to time the alternatives).
LAMPORT_PUSH_SPLIT = None
PUSH_CHUNK_MIN = 1024
# Warps per Lamport CTA; None: block_config's. Timing experiments only (bench/kernel_timing.py).
LAMPORT_NUM_WARPS = None


def lamport_push_split(rows: int, block_h: int, sms: int) -> int:
    """Chunks per row for the Lamport push: a power of 2, at most ``block_h // PUSH_CHUNK_MIN``, no more than
    fills ``sms`` CTAs with ``rows`` rows, and 8 chunks in all for the smallest calls."""
    if LAMPORT_PUSH_SPLIT is not None:
        limit = max(1, min(int(LAMPORT_PUSH_SPLIT), block_h // 256))
    else:
        # Measured at TP4/8192 (bench/NOTES.md): 8 chunks for 1 row, 2 for 4 to 64 rows; more CTAs than that
        # only added launch and polling work.
        rows = max(rows, 1)
        limit = max(1, min(block_h // PUSH_CHUNK_MIN, sms // rows, max(2, 8 // rows)))
    return 1 << (limit.bit_length() - 1)


def lamport_grid(rows: int, split: int, sms: int, max_grid: int = MAX_GRID) -> int:
    """CTAs for the Lamport kernel. With a split push the CTA polling a row waits for chunks pushed by other CTAs of
    its own and every peer's grid, so every CTA must be resident at once: the grid stays within one CTA per SM.
    (Like every spinning kernel, and FlashInfer's, it assumes no other work holds the SMs indefinitely; if some
    does, the bounded wait turns it into a PeerTimeoutError, not a hang.)"""
    if split == 1:
        return grid_size(rows, max_grid)
    return grid_size(rows * split, min(sms, max_grid))


class SymmArgs:
    """What the symmetric-memory launchers need from a workspace: the peers' buffer and signal-pad addresses
    (8-tuples, unused entries 0), the host-mapped records a kernel writes (``err_ptr``: a peer timeout;
    ``guard_ptr``: a MoE index out of range), rank layout, region offsets (in elements of the workspace dtype), the
    per-family call counters (int32 device tensors ``[epoch, arrivals]``), the per-block barrier generations
    (int32, one per signal-pad block slot) and the grid limits: ``max_grid`` (the most CTAs of any launch),
    ``barrier_slots`` (block ids the signal pad holds) and ``sms`` (the SMs the Lamport push splits its rows for; a
    grid that needs all its CTAs resident spans at most ``min(sms, max_grid)``: virtual ranks share one GPU, so
    their ``max_grid`` is their share of it and their ``sms`` the whole GPU's)."""

    __slots__ = ("peer_ptrs", "pad_ptrs", "err_ptr", "guard_ptr", "lamport_state", "one_shot_state", "lts_state",
                 "barrier_gen", "rank", "world_size", "timeout_ns", "max_grid", "barrier_slots", "sms", "one_shot_off",
                 "one_shot_half", "zero_copy_off",
                 "two_shot_off", "two_shot_slot", "gather_off", "lamport_off", "lamport_slot", "lamport_buffer",
                 "lts_rs_off", "lts_rs_buffer", "lts_gather_off", "lts_gather_buffer")

    def __init__(self, **fields):
        missing = set(self.__slots__) - set(fields)
        if missing:
            raise TypeError(f"SymmArgs: missing {sorted(missing)}")
        for k, val in fields.items():
            setattr(self, k, val)


MIN_KERNEL_GROUP = 8


def kernel_group_size_reason(spec) -> Optional[str]:
    """Why arfuse's kernels cannot run ``spec``'s group size (they reshape a row into groups: powers of two
    only), or None."""
    g = spec.group_size
    if g and (g & (g - 1) or g < MIN_KERNEL_GROUP):
        return f"{spec.name}: group_size {g} is not a power of two >= {MIN_KERNEL_GROUP} (arfuse's kernels need one)"
    return None


def epilogue_args(call, spec) -> tuple:
    """The epilogue arguments every kernel takes, in order: ``res_ptr, w_ptr, out_ptr, res_out_ptr, norm_ptr,
    scale_ptr, scale_out_ptr, scale_row_stride, scale_col_stride, eps, weight_offset`` (unused ones None/0)."""
    scale_out = call.scale_out if spec.dynamic_scale else None
    row_stride, col_stride = scale_out.stride() if scale_out is not None else (0, 0)
    return (call.residual if spec.residual else None, call.weight if spec.norm else None, call.out,
            call.residual_out if spec.residual else None, call.norm_out if spec.also_norm else None,
            call.scale if spec.quant is Quant.FP8_STATIC else None, scale_out, int(row_stride), int(col_stride), float(call.eps),
            float(call.weight_offset) if spec.weight_offset else 0.0)


def prologue_args(call, guard_ptr: int) -> tuple:
    """The prologue arguments every kernel with a MoE prologue takes, in order: ``idx_ptr, esc_ptr, shared_ptr,
    guard_ptr, n_expert_rows, top_k`` (None/0 for specs without it)."""
    if call.expert_idx is None:
        return None, None, None, 0, 0, 1
    return (call.expert_idx, call.expert_scales, call.shared, int(guard_ptr), int(call.x.shape[0]),
            int(call.expert_idx.shape[1]))
