"""Launch shapes shared by the kernels (plain Python: importable without Triton)."""

# Ids the kernels write into the error record (must match OP_* in _sync.py).
OP_NAMES = {1: "lamport one-shot", 2: "one-shot", 3: "two-shot", 4: "lamport two-shot"}

# A CTA handles whole rows; rows beyond the grid are looped over (persistent grid).
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


def lamport_grid(rows: int, split: int, sms: int) -> int:
    """CTAs for the Lamport kernel. With a split push the CTA polling a row waits for chunks pushed by other CTAs of
    its own and every peer's grid, so every CTA must be resident at once: the grid stays within one CTA per SM.
    (Like every spinning kernel, and FlashInfer's, it assumes no other work holds the SMs indefinitely; if some
    does, the bounded wait turns it into a PeerTimeoutError, not a hang.)"""
    if split == 1:
        return grid_size(rows, MAX_GRID)
    return grid_size(rows * split, sms)


class SymmArgs:
    """What the symmetric-memory launchers need from a workspace: the peers' buffer and signal-pad addresses
    (8-tuples, unused entries 0), rank layout, region offsets (in elements of the workspace dtype), the
    per-family call counters (int32 device tensors ``[epoch, arrivals]``) and the per-block barrier generations
    (int32, one per signal-pad block slot)."""

    __slots__ = ("peer_ptrs", "pad_ptrs", "err_ptr", "lamport_state", "one_shot_state", "lts_state", "barrier_gen",
                 "rank", "world_size", "timeout_ns", "max_grid", "sms", "one_shot_off", "one_shot_half", "zero_copy_off",
                 "two_shot_off", "two_shot_slot", "gather_off", "lamport_off", "lamport_slot", "lamport_buffer",
                 "lts_rs_off", "lts_rs_buffer", "lts_gather_off", "lts_gather_buffer")

    def __init__(self, **fields):
        missing = set(self.__slots__) - set(fields)
        if missing:
            raise TypeError(f"SymmArgs: missing {sorted(missing)}")
        for k, val in fields.items():
            setattr(self, k, val)


def pattern_code(spec) -> int:
    """The kernels' PATTERN constant for a classic spec: 0 allreduce, 1 RMSNorm, 2 residual + RMSNorm, 3 + FP8."""
    if not spec.norm:
        return 0
    if not spec.residual:
        return 1
    return 3 if spec.quant else 2
