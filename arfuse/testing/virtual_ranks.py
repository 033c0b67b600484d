"""Virtual ranks: W ranks of the ``triton_symm`` backend in one process on one device, so its multi-rank kernels run
and can be checked where only one GPU is at hand (and, under Triton's interpreter, on the CPU).

Each rank gets what a real rank gets, built by the same code: its own buffer laid out by
:func:`~arfuse.backends.symm_workspace.layout`, its own signal pad, call counters, error record and MoE index guard
(:class:`~arfuse.backends.symm_workspace.RankMemory`), and a :class:`~arfuse.backends.symm_workspace.SymmWorkspace`
whose launch arguments hold every rank's addresses (:func:`~arfuse.backends.symm_workspace.symm_args`). A call runs
through ``TritonSymmBackend.run`` on every rank, each rank on its own CUDA stream so that all W grids run at once:
every rank's grid is capped at ``SMs // W`` CTAs so all of them are resident together (the kernels spin on their
peers), and every rank's kernel is compiled before any rank launches (``_launch.compile_only``), since a rank
spinning on a peer that is still compiling would time out.

What this proves and what it cannot: the kernels' math, indexing, epilogues, prologue, the protocol's logic,
bitwise identity across ranks, CUDA graphs and timeouts at W = 2..8; not the ordering of memory operations across
GPUs over NVLink (here every rank's memory is the same GPU's) nor any speed.

On a GPU, every rank's stream needs a hardware queue of its own (a kernel queued behind a peer's spinning kernel
would never start): set ``CUDA_DEVICE_MAX_CONNECTIONS`` to at least W + 1 before CUDA starts. On the CPU
(``TRITON_INTERPRET=1``; see :mod:`arfuse.testing.interpreter`) the ranks run as threads, one CTA each.
"""
from __future__ import annotations

import os
import threading
from typing import Collection, List, Optional, Sequence

import torch

from arfuse.backends import symm_workspace as sw
from arfuse.backends.base import get
from arfuse.core.errors import PeerTimeoutError
from arfuse.core.spec import FusionSpec
from arfuse.core.types import Capacity, FusedCall
from arfuse.kernels import _launch

BACKEND = "triton_symm"
CONNECTIONS_ENV, DEFAULT_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS", 8


class VirtualRanks:
    """``world_size`` ranks of ``triton_symm`` for calls of up to ``max_tokens`` rows of ``hidden`` in ``dtype`` on
    ``device``. ``sms``: the SMs the ranks share (default: the device's; on the CPU one CTA per rank).
    ``timeout_s``: the kernels' bound on any wait for a peer."""

    def __init__(self, world_size: int, max_tokens: int, hidden: int, dtype: torch.dtype, device,
                 timeout_s: float = 10.0, sms: Optional[int] = None):
        from arfuse.backends.triton_symm import LAMPORT_MAX_BYTES, ONE_SHOT_MAX_BYTES, TWO_SHOT_MAX_BYTES

        if not 2 <= world_size <= sw.MAX_PEERS:
            raise ValueError(f"VirtualRanks: world_size must be in 2..{sw.MAX_PEERS}, got {world_size}")
        self.device = torch.device(device)
        self.world_size = world_size
        connections = int(os.environ.get(CONNECTIONS_ENV, DEFAULT_CONNECTIONS))
        if self.device.type == "cuda" and connections < world_size + 1:
            raise ValueError(f"VirtualRanks: {world_size} ranks need {CONNECTIONS_ENV} >= {world_size + 1} (one "
                             f"hardware queue per rank's stream), found {connections}; set it before CUDA starts")
        self.capacity = cap = Capacity(max_tokens, hidden, dtype, self.device, timeout_s)
        cuda = self.device.type == "cuda"
        if sms is None:
            sms = sw._sm_count(self.device) if cuda else world_size
        per_rank = sms // world_size
        if per_rank < 1:
            raise ValueError(f"VirtualRanks: {sms} SMs cannot hold one CTA for each of {world_size} ranks")
        pad_bytes = sw._signal_pad_bytes() if cuda else sw.DEFAULT_SIGNAL_PAD_BYTES
        self.limits = sw.GridLimits(per_rank, sw.barrier_slots(world_size, pad_bytes), per_rank)
        one_shot = sw.tokens_within(cap, ONE_SHOT_MAX_BYTES)
        lay = sw.layout(hidden, world_size, one_shot, sw.tokens_within(cap, LAMPORT_MAX_BYTES),
                        sw.tokens_within(cap, TWO_SHOT_MAX_BYTES))
        memories = [sw.RankMemory(cap, lay, self.limits) for _ in range(world_size)]
        self.pads = [torch.zeros(pad_bytes // 4, dtype=torch.int32, device=self.device) for _ in range(world_size)]
        peers = [m.buffer.data_ptr() for m in memories]
        pads = [p.data_ptr() for p in self.pads]
        self.workspaces = [sw.SymmWorkspace(cap, lay, m, sw.symm_args(cap, lay, m, peers, pads, r, world_size,
                                                                        self.limits), one_shot)
                           for r, m in enumerate(memories)]
        self.streams = [torch.cuda.Stream(self.device) for _ in range(world_size)] if cuda else []
        self.backend = get(BACKEND)

    def input_buffer(self, rank: int, variant: str, num_tokens: int) -> Optional[torch.Tensor]:
        """Rank ``rank``'s zero-copy input buffer for ``variant`` (see ``SymmWorkspace.input_buffer``)."""
        return self.workspaces[rank].input_buffer(variant, num_tokens)

    def compile(self, variant: str, spec: FusionSpec, calls: Sequence[FusedCall]) -> None:
        """Compile every rank's kernel for these calls without launching any (nothing to do when compiled)."""
        self._check_calls(calls)
        with _launch.compile_only():
            for ws, call in zip(self.workspaces, calls):
                self.backend.run(ws, variant, spec, call)

    def run(self, variant: str, spec: FusionSpec, calls: Sequence[FusedCall], skip: Collection[int] = ()) -> None:
        """One collective call: ``calls[r]`` on rank ``r``, every rank at once (``skip``: ranks that do not take
        part, as a rank that skipped the call). On a GPU it returns once every rank's launch is queued on its own
        stream, joined into the current one (so it can be captured in one CUDA graph); on the CPU once every rank
        returned. Errors a kernel records surface in :meth:`raise_if_failed`."""
        self.compile(variant, spec, calls)
        ranks = [r for r in range(self.world_size) if r not in skip]
        if self.streams:
            current = torch.cuda.current_stream(self.device)
            for r in ranks:
                self.streams[r].wait_stream(current)
                with torch.cuda.stream(self.streams[r]):
                    self.backend.run(self.workspaces[r], variant, spec, calls[r])
            for r in ranks:
                current.wait_stream(self.streams[r])
            return
        self._run_threads(variant, spec, calls, ranks)

    def _run_threads(self, variant: str, spec: FusionSpec, calls: Sequence[FusedCall], ranks: List[int]) -> None:
        from arfuse.testing.interpreter import ranks_as_threads

        errors: List[BaseException] = []

        def rank_main(r: int) -> None:
            try:
                self.backend.run(self.workspaces[r], variant, spec, calls[r])
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)

        with ranks_as_threads():
            threads = [threading.Thread(target=rank_main, args=(r,), name=f"virtual-rank-{r}") for r in ranks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]

    def raise_if_failed(self) -> None:
        """Raise the first rank's recorded error (a ``PeerTimeoutError``), if any (after a synchronize)."""
        self.synchronize()
        for ws in self.workspaces:
            ws.raise_if_failed()

    def failures(self) -> List[Optional[str]]:
        """Per rank, the timeout it recorded (the ``PeerTimeoutError`` message) or None (after a synchronize)."""
        self.synchronize()
        found = []
        for ws in self.workspaces:
            try:
                ws.raise_if_failed()
                found.append(None)
            except PeerTimeoutError as e:
                found.append(str(e))
        return found

    def index_errors(self) -> List[Optional[str]]:
        """Per rank, what its MoE index guard recorded (after a synchronize)."""
        self.synchronize()
        return [ws.input_error() for ws in self.workspaces]

    def clear_index_guards(self) -> None:
        """Forget what the ranks' index guards recorded (a fusion object never does: this is for checks that
        need to see which call set one)."""
        self.synchronize()
        for ws in self.workspaces:
            ws.index_guard.host.zero_()
            ws.index_guard.flag.zero_()

    def synchronize(self) -> None:
        """Wait for every rank's launches (on a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _check_calls(self, calls: Sequence[FusedCall]) -> None:
        if len(calls) != self.world_size:
            raise ValueError(f"VirtualRanks: {self.world_size} ranks need {self.world_size} calls, got {len(calls)}")

    def close(self) -> None:
        """Free every rank's memory (after the last call)."""
        for ws in self.workspaces:
            ws.close()
        self.workspaces, self.pads = [], []
