"""Symmetric-memory workspace for arfuse's own kernels: one ``torch.distributed._symmetric_memory`` allocation per
fusion object, carved into regions, plus the device-side call counters and a host-mapped error record.

Layout (elements of the workspace dtype; every offset a multiple of 64 so kernels move 16-byte vectors):
  one-shot input, two halves | one-shot zero-copy input | two-shot: world_size slots of one token chunk
  (the peers' rows of this rank's chunk) | two-shot gather buffer (every chunk's sums) || sentinel-filled, for the
  barrier-free kernels: Lamport one-shot, 2 buffers x world_size slots | Lamport two-shot reduce slots, 2 buffers
  | Lamport two-shot gather, 2 buffers. Host-mapped: the timeout record and the MoE index guard.
Multicast is never used: only the peers' own pointers (peer-to-peer NVLink).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from arfuse.backends.base import IndexGuard, Workspace
from arfuse.core.errors import BackendError, PeerTimeoutError
from arfuse.core.types import Capacity
from arfuse.kernels.launch_config import MAX_GRID, OP_NAMES, SymmArgs
from arfuse.probe import vote

DEFAULT_SIGNAL_PAD_BYTES = 9216  # torch's default; read from torch when it can tell
MAX_PEERS = 8


def _signal_pad_bytes() -> int:
    import torch.distributed._symmetric_memory as symm_mem

    getter = getattr(symm_mem, "get_signal_pad_size", None)
    return int(getter()) if getter is not None else DEFAULT_SIGNAL_PAD_BYTES


def _sm_count(device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _round64(n: int) -> int:
    # Multiples of 64 elements keep every offset divisible by 16, which Triton specialises on, so every
    # derived address is provably 16-byte aligned and loads/stores stay 16 bytes wide.
    return (n + 63) // 64 * 64


def _padded(values) -> tuple:
    values = [int(v) for v in values]
    return tuple(values + [0] * (MAX_PEERS - len(values)))


class Layout(NamedTuple):
    """Region offsets and sizes of the symmetric buffer, in elements."""

    offsets: Dict[str, int]
    total: int
    one_shot_half: int
    two_shot_slot: int
    gather: int
    lamport_slot: int


def layout(hidden: int, world_size: int, one_shot_tokens: int, lamport_tokens: int, two_shot_tokens: int) -> Layout:
    """Where each kernel's regions live (see the module docstring). Pure; every offset is a multiple of 64."""
    one_shot_half = _round64(one_shot_tokens * hidden)
    two_shot_slot = _round64(-(-two_shot_tokens // world_size) * hidden)
    gather = _round64(two_shot_tokens * hidden)
    lamport_slot = _round64(lamport_tokens * hidden)
    offsets, cursor = {}, 0
    for name, size in (("one_shot", 2 * one_shot_half), ("zero_copy", one_shot_half),
                       ("two_shot", world_size * two_shot_slot), ("gather", gather),
                       ("lamport", 2 * world_size * lamport_slot), ("lts_rs", 2 * world_size * two_shot_slot),
                       ("lts_gather", 2 * gather)):
        offsets[name], cursor = cursor, cursor + size
    return Layout(offsets, cursor, one_shot_half, two_shot_slot, gather, lamport_slot)


class GridLimits(NamedTuple):
    """How many CTAs one rank's launches may use: ``max_grid`` caps every persistent grid, ``barrier_slots`` is how
    many block ids the signal pad holds (the barrier kernels' grids stay within it) and ``sms`` is how many SMs a
    grid that needs every CTA resident at once (the split Lamport push) may span."""

    max_grid: int
    barrier_slots: int
    sms: int


def barrier_slots(world_size: int, pad_bytes: int) -> int:
    """Block ids a signal pad of ``pad_bytes`` holds: one int32 flag per rank per block id."""
    return pad_bytes // (4 * world_size)


def gpu_limits(device, world_size: int) -> GridLimits:
    """The limits of a rank that has its GPU to itself (real ranks)."""
    return GridLimits(MAX_GRID, barrier_slots(world_size, _signal_pad_bytes()), _sm_count(device))


class RankMemory:
    """What one rank owns: its symmetric ``buffer`` (laid out by :func:`layout`), its kernels' device-side call
    counters and barrier generations (``state``), the host-mapped timeout record (``err``) and the MoE index guard.
    ``empty`` allocates the buffer (torch symmetric memory for real ranks, plain memory for virtual ones)."""

    def __init__(self, capacity: Capacity, lay: Layout, limits: GridLimits, empty: Callable = torch.empty):
        dev = torch.device(capacity.device)
        self.buffer = empty(lay.total, dtype=capacity.dtype, device=dev)
        self.state = torch.zeros(6 + limits.barrier_slots, dtype=torch.int32, device=dev)
        self.err = torch.zeros(4, dtype=torch.int32, pin_memory=dev.type == "cuda")
        self.index_guard = IndexGuard(dev)
        fill_sentinel(self.buffer, lay.offsets["lamport"])


def fill_sentinel(buffer: torch.Tensor, start: int) -> None:
    """Fill ``buffer[start:]`` (the barrier-free kernels' regions) with -0.0, their "not yet written" mark."""
    tail = buffer[start:]
    bits = tail.view(torch.int16 if tail.element_size() == 2 else torch.int32)
    bits.fill_(-32768 if tail.element_size() == 2 else -(2 ** 31))


def symm_args(capacity: Capacity, lay: Layout, memory: RankMemory, peer_ptrs: Sequence[int],
              pad_ptrs: Sequence[int], rank: int, world_size: int, limits: GridLimits) -> SymmArgs:
    """Rank ``rank``'s launch arguments from every rank's buffer and signal-pad addresses (in rank order) and its
    own memory: what both the real rendezvous and the virtual ranks of :mod:`arfuse.testing.virtual_ranks` build."""
    if len(peer_ptrs) != world_size or len(pad_ptrs) != world_size:
        raise ValueError(f"symm_args: {world_size} ranks need {world_size} buffer and signal-pad addresses, got "
                         f"{len(peer_ptrs)} and {len(pad_ptrs)}")
    state, off = memory.state, lay.offsets
    return SymmArgs(
        peer_ptrs=_padded(peer_ptrs), pad_ptrs=_padded(pad_ptrs), err_ptr=memory.err.data_ptr(),
        guard_ptr=memory.index_guard.ptr, lamport_state=state[0:2], one_shot_state=state[2:4], lts_state=state[4:6],
        barrier_gen=state[6:], rank=rank, world_size=world_size, timeout_ns=int(capacity.timeout_s * 1e9),
        max_grid=limits.max_grid, barrier_slots=limits.barrier_slots, sms=limits.sms,
        one_shot_off=off["one_shot"], one_shot_half=lay.one_shot_half, zero_copy_off=off["zero_copy"],
        two_shot_off=off["two_shot"], two_shot_slot=lay.two_shot_slot, gather_off=off["gather"],
        lamport_off=off["lamport"], lamport_slot=lay.lamport_slot, lamport_buffer=world_size * lay.lamport_slot,
        lts_rs_off=off["lts_rs"], lts_rs_buffer=world_size * lay.two_shot_slot, lts_gather_off=off["lts_gather"],
        lts_gather_buffer=lay.gather)


class SymmWorkspace(Workspace):
    """Buffers and launch arguments of one rank for ``triton_symm``: its :class:`RankMemory` and the
    :class:`SymmArgs` that hold every rank's addresses. :meth:`rendezvous` builds it for real ranks (collective);
    :mod:`arfuse.testing.virtual_ranks` builds W of them in one process."""

    def __init__(self, capacity: Capacity, lay: Layout, memory: RankMemory, args: SymmArgs, one_shot_tokens: int,
                 handle=None):
        super().__init__()
        self.capacity, self.offsets, self.memory, self.args = capacity, lay.offsets, memory, args
        self.rank, self.world_size, self.one_shot_tokens = args.rank, args.world_size, one_shot_tokens
        self.buffer, self.state, self.err, self.index_guard = memory.buffer, memory.state, memory.err, \
            memory.index_guard
        self.handle = handle
        self.failed: Optional[str] = None
        self._err_view = self.err.numpy()

    @classmethod
    def rendezvous(cls, capacity: Capacity, group, rank: int, world_size: int, one_shot_tokens: int,
                   lamport_tokens: int, two_shot_tokens: int) -> "SymmWorkspace":
        """Allocate this rank's memory in torch symmetric memory, exchange addresses with every rank of ``group``
        and check P2P access for real. Collective: every rank runs the same collectives whatever fails on it (an
        allocation failure is voted on before the rendezvous, which would wait for the failed rank; the P2P check
        votes after its last barrier)."""
        import torch.distributed._symmetric_memory as symm_mem

        lay = layout(capacity.hidden_size, world_size, one_shot_tokens, lamport_tokens, two_shot_tokens)
        limits = gpu_limits(capacity.device, world_size)
        memory, failed = None, None
        try:
            memory = RankMemory(capacity, lay, limits, empty=symm_mem.empty)
        except RuntimeError as e:  # e.g. out of memory on one rank: its peers must not wait for it in the rendezvous
            failed = f"{type(e).__name__}: {e}"
        ok, reason = vote.agree(failed is None, failed, group)
        if not ok:
            raise BackendError(f"triton_symm: workspace allocation failed on {reason}")
        handle = symm_mem.rendezvous(memory.buffer, group if group is not None else dist.group.WORLD)
        args = symm_args(capacity, lay, memory, list(handle.buffer_ptrs), list(handle.signal_pad_ptrs), rank,
                         world_size, limits)
        ws = cls(capacity, lay, memory, args, one_shot_tokens, handle)
        ws._check_peer_access(group)
        return ws

    def _check_peer_access(self, group) -> None:
        """Write a rank-specific pattern, then read every peer's through its P2P mapping (the driver's answer
        to "can access peer" is not trusted)."""
        probe = self.buffer[self.offsets["zero_copy"]:self.offsets["zero_copy"] + 8]
        probe.fill_(float(self.rank + 1))
        torch.cuda.synchronize()
        dist.barrier(group=group)
        wrong = None
        for peer in range(self.world_size):
            view = self.handle.get_buffer(peer, (8,), self.capacity.dtype, self.offsets["zero_copy"])
            got = view.float().cpu()
            if wrong is None and not torch.all(got == peer + 1):
                wrong = f"reads wrong data from rank {peer}'s buffer (expected {peer + 1}, got {got.tolist()})"
        dist.barrier(group=group)  # every rank gets here whatever it read, so none is left waiting
        torch.cuda.synchronize()
        ok, reason = vote.agree(wrong is None, wrong, group)
        if not ok:
            raise BackendError(f"triton_symm: P2P access does not work: {reason}")

    def input_buffer(self, variant: str, num_tokens: int) -> Optional[torch.Tensor]:
        """Only the one-shot kernel copies its input in; the others read ``x`` where it is."""
        if variant != "one_shot" or num_tokens > self.one_shot_tokens:
            return None
        start, h = self.offsets["zero_copy"], self.capacity.hidden_size
        return self.buffer[start:start + num_tokens * h].view(num_tokens, h)

    def is_zero_copy(self, x: torch.Tensor) -> bool:
        return x.data_ptr() == self.buffer.data_ptr() + self.offsets["zero_copy"] * x.element_size()

    def raise_if_failed(self) -> None:
        if self.failed is None and self._err_view[0] != 0:
            _, op, peer, rank = (int(v) for v in self._err_view)
            whom = f"rank {peer}" if peer >= 0 else "a peer"
            self.failed = (f"arfuse triton_symm: the {OP_NAMES.get(op, 'unknown')} kernel on rank {rank} waited "
                           f"more than {self.capacity.timeout_s:g} s for {whom} (it skipped the call, passed "
                           f"other shapes, or died); this fusion object can no longer be used: close it")
        if self.failed is not None:
            raise PeerTimeoutError(self.failed)

    def _release(self) -> None:
        self.args = self.handle = self.memory = None
        self.buffer = self.state = None


def tokens_within(capacity: Capacity, max_bytes: int) -> int:
    """How many tokens of ``capacity``'s rows fit in ``max_bytes`` (at least 1, at most its max_tokens)."""
    per_token = capacity.hidden_size * capacity.itemsize
    return max(1, min(capacity.max_tokens, max_bytes // per_token))
