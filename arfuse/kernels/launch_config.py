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


class SymmArgs:
    """What the symmetric-memory launchers need from a workspace: the peers' buffer and signal-pad addresses
    (8-tuples, unused entries 0), rank layout, region offsets (in elements of the workspace dtype), the
    per-family call counters (int32 device tensors ``[epoch, arrivals]``) and the per-block barrier generations
    (int32, one per signal-pad block slot)."""

    __slots__ = ("peer_ptrs", "pad_ptrs", "err_ptr", "lamport_state", "one_shot_state", "lts_state", "barrier_gen",
                 "rank", "world_size", "timeout_ns", "max_grid", "one_shot_off", "one_shot_half", "zero_copy_off",
                 "two_shot_off", "two_shot_slot", "gather_off", "lamport_off", "lamport_slot", "lamport_buffer",
                 "lts_rs_off", "lts_rs_buffer", "lts_gather_off", "lts_gather_buffer")

    def __init__(self, **fields):
        missing = set(self.__slots__) - set(fields)
        if missing:
            raise TypeError(f"SymmArgs: missing {sorted(missing)}")
        for k, val in fields.items():
            setattr(self, k, val)
