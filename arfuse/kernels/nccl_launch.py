"""How the NCCL path's two kernels are launched (the epilogue and the MoE finalize), per hidden size and token
range, from the launch table (``launch_table``); plain Python, importable without Triton. The symmetric-memory
kernels do not read it: their launches are ``launch_config``'s."""
from typing import NamedTuple, Optional, Tuple

from arfuse.kernels import launch_table
from arfuse.kernels.launch_config import MAX_GRID, block_config, next_power_of_2


class EpilogueLaunch(NamedTuple):
    """How the NCCL path's epilogue kernel is launched: a tile of ``rows`` rows of ``block_h`` columns per loop
    step, ``num_warps`` warps, at most ``max_ctas`` CTAs looping over the tiles (0: one CTA per tile), and
    whether the summed rows and the residual are loaded as evict-first (the weight then as evict-last)."""

    block_h: int
    rows: int
    num_warps: int
    max_ctas: int
    evict_first: bool = False


# Forces one (rows, num_warps, max_ctas[, evict_first]) launch for every epilogue call (benchmarks and sweeps
# only); None: the launch table (``launch_table``: per hidden size and token range), else the default launch.
EPILOGUE_OVERRIDE: Optional[Tuple] = None


def default_epilogue_launch(hidden: int) -> EpilogueLaunch:
    block_h, num_warps = block_config(hidden)
    return EpilogueLaunch(block_h, 1, num_warps, MAX_GRID)


def _epilogue_from(hidden: int, launch: dict) -> EpilogueLaunch:
    return EpilogueLaunch(next_power_of_2(hidden), launch["rows"], launch["num_warps"], launch["max_ctas"],
                          launch.get("evict_first", False))


def epilogue_launch(hidden: int, tokens: int, dtype=None, device: int = -1) -> EpilogueLaunch:
    """The epilogue launch for ``tokens`` rows of ``hidden`` (see :class:`EpilogueLaunch`) of a ``dtype`` tensor
    on CUDA device ``device`` (-1: CPU)."""
    if EPILOGUE_OVERRIDE is not None:
        return EpilogueLaunch(next_power_of_2(hidden), *EPILOGUE_OVERRIDE)
    return launch_table.pick(launch_table.ranges("epilogue", hidden, dtype, device, _epilogue_from,
                                                 default_epilogue_launch), tokens)


def epilogue_grid(tokens: int, launch: EpilogueLaunch) -> int:
    tiles = -(-max(tokens, 1) // launch.rows)
    return max(1, min(tiles, launch.max_ctas) if launch.max_ctas else tiles)


class MoeLaunch(NamedTuple):
    """How the NCCL path's MoE finalize kernel is launched: tiles of ``block_h`` columns of one token (a token's
    columns split over ``cdiv(hidden, block_h)`` tiles), ``num_warps`` warps, at most ``max_ctas`` CTAs looping
    over the tiles (0: one CTA per tile), ``slots`` expert slots loaded per step (``_prologue``)."""

    block_h: int
    num_warps: int
    max_ctas: int
    slots: int


# Forces one MoeLaunch for every MoE finalize call (benchmarks only); None: the launch table, else the default.
MOE_OVERRIDE: Optional[MoeLaunch] = None


def default_moe_launch(hidden: int) -> MoeLaunch:
    """One CTA per token's whole row (at most MAX_GRID CTAs), four slots per step."""
    block_h, num_warps = block_config(hidden)
    return MoeLaunch(block_h, num_warps, MAX_GRID, 4)


def _moe_from(hidden: int, launch: dict) -> MoeLaunch:
    return MoeLaunch(launch["block_h"], launch["num_warps"], launch["max_ctas"], launch["slots"])


def moe_launch(hidden: int, tokens: int, dtype=None, device: int = -1) -> MoeLaunch:
    """The MoE finalize launch for ``tokens`` tokens of ``hidden`` (see :class:`MoeLaunch`)."""
    if MOE_OVERRIDE is not None:
        return MOE_OVERRIDE
    return launch_table.pick(launch_table.ranges("moe_finalize", hidden, dtype, device, _moe_from,
                                                 default_moe_launch), tokens)


def moe_grid(tokens: int, hidden: int, launch: MoeLaunch) -> int:
    tiles = max(tokens, 1) * -(-hidden // launch.block_h)
    return max(1, min(tiles, launch.max_ctas) if launch.max_ctas else tiles)
