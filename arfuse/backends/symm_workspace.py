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

from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist

from arfuse.backends.base import IndexGuard, Workspace
from arfuse.core.errors import BackendError, PeerTimeoutError
from arfuse.core.types import Capacity
from arfuse.kernels.launch_config import OP_NAMES, SymmArgs
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


class SymmWorkspace(Workspace):
    """Buffers and handles for ``triton_symm``. Collective to create (rendezvous + a real P2P check).

    Every rank runs the same collectives whatever fails on it: an allocation failure is voted on before the
    rendezvous (which would wait for the failed rank), and the P2P check votes after its last barrier.
    """

    def __init__(self, capacity: Capacity, group, rank: int, world_size: int, one_shot_tokens: int,
                 lamport_tokens: int, two_shot_tokens: int):
        super().__init__()
        import torch.distributed._symmetric_memory as symm_mem

        self.capacity = capacity
        self.rank, self.world_size = rank, world_size
        self.one_shot_tokens = one_shot_tokens
        self.failed: Optional[str] = None
        dev = capacity.device
        lay = layout(capacity.hidden_size, world_size, one_shot_tokens, lamport_tokens, two_shot_tokens)
        self.offsets = offsets = lay.offsets
        max_grid = _signal_pad_bytes() // (4 * world_size)
        failed = None
        try:
            self.buffer = symm_mem.empty(lay.total, dtype=capacity.dtype, device=dev)
            self.state = torch.zeros(6 + max_grid, dtype=torch.int32, device=dev)
            self.err = torch.zeros(4, dtype=torch.int32, pin_memory=True)
            self.index_guard = IndexGuard(dev)
        except RuntimeError as e:  # e.g. out of memory on one rank: its peers must not wait for it in the rendezvous
            failed = f"{type(e).__name__}: {e}"
        ok, reason = vote.agree(failed is None, failed, group)
        if not ok:
            raise BackendError(f"triton_symm: workspace allocation failed on {reason}")
        self.handle = symm_mem.rendezvous(self.buffer, group if group is not None else dist.group.WORLD)
        self._fill_sentinel(offsets["lamport"])
        self._err_view = self.err.numpy()
        self.args = SymmArgs(
            peer_ptrs=_padded(self.handle.buffer_ptrs), pad_ptrs=_padded(self.handle.signal_pad_ptrs),
            err_ptr=self.err.data_ptr(), guard_ptr=self.index_guard.ptr, lamport_state=self.state[0:2],
            one_shot_state=self.state[2:4], lts_state=self.state[4:6], barrier_gen=self.state[6:], rank=rank,
            world_size=world_size,
            timeout_ns=int(capacity.timeout_s * 1e9), max_grid=max_grid, sms=_sm_count(dev),
            one_shot_off=offsets["one_shot"], one_shot_half=lay.one_shot_half, zero_copy_off=offsets["zero_copy"],
            two_shot_off=offsets["two_shot"], two_shot_slot=lay.two_shot_slot, gather_off=offsets["gather"],
            lamport_off=offsets["lamport"], lamport_slot=lay.lamport_slot,
            lamport_buffer=world_size * lay.lamport_slot, lts_rs_off=offsets["lts_rs"],
            lts_rs_buffer=world_size * lay.two_shot_slot, lts_gather_off=offsets["lts_gather"],
            lts_gather_buffer=lay.gather)
        self._check_peer_access(group)

    def _fill_sentinel(self, start: int) -> None:
        """Fill the barrier-free kernels' buffers with -0.0, their "not yet written" mark."""
        tail = self.buffer[start:]
        bits = tail.view(torch.int16 if tail.element_size() == 2 else torch.int32)
        bits.fill_(-32768 if tail.element_size() == 2 else -(2 ** 31))

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
        self.args = None
        self.handle = None
        self.buffer = None
        self.state = None


def tokens_within(capacity: Capacity, max_bytes: int) -> int:
    """How many tokens of ``capacity``'s rows fit in ``max_bytes`` (at least 1, at most its max_tokens)."""
    per_token = capacity.hidden_size * capacity.itemsize
    return max(1, min(capacity.max_tokens, max_bytes // per_token))
