"""Fault injection for reliability tests: a backend that fails where a test chooses, and a patch that makes any
callable raise on chosen ranks.

:class:`FaultBackend` computes with the reference math under its own name, so whatever survives a fault can be
checked against the float64 oracle. Nothing here is registered on import.

>>> backend = FaultBackend("doc_fault", prepare_fails_on=(1,))
>>> with registered(backend):
...     "doc_fault" in [b.name for b in base.registered()]
True
>>> "doc_fault" in [b.name for b in base.registered()]
False
"""
from __future__ import annotations

import contextlib
import functools
from typing import Collection, Iterator, List, Optional

import torch

from arfuse.backends import base
from arfuse.backends.torch_ref import RefWorkspace, TorchRefBackend

GARBAGE = 12345.0  # what a failing run leaves in its outputs: finite, so only a value check can catch it


class InjectedFault(RuntimeError):
    """The error every injected fault raises, so a test can tell it from a real failure."""


class FaultWorkspace(RefWorkspace):
    """A reference workspace that counts its fusion object's ``run`` calls and tells its backend when it is
    released (to count live workspaces)."""

    def __init__(self, owner: "FaultBackend", group, world_size: int):
        super().__init__(group, world_size)
        self.owner = owner
        self.runs = 0
        owner.live += 1
        owner.made.append(self)

    def _release(self) -> None:
        self.owner.live -= 1


class FaultBackend(TorchRefBackend):
    """The reference math, failing on purpose.

    ``prepare_fails_on``: group ranks whose ``prepare`` raises. ``run_fails_on``: 1-based numbers of a
    workspace's ``run`` calls (i.e. of one fusion object's calls on this path) that raise, after writing
    :data:`GARBAGE` into ``out`` (and into the residual output too when ``corrupt_residual``, which in place is the
    residual input itself): a partial output that must never be returned as valid. ``run_fails_on_ranks``: only
    those group ranks fail (default: every rank); ``fail_after_compute``: the failing call first computes, its
    collective included, as a launch error reported after the kernel ran would. Keeps ``prepared`` (calls),
    ``made`` (the workspaces, in order, each with its ``runs``) and ``live`` (workspaces not yet closed).
    """

    needs_prepare_vote = True  # its prepare can fail on one rank alone: the ranks must agree
    multi_host = True

    def __init__(self, name: str, *, priority: int = 1, prepare_fails_on: Collection[int] = (),
                 run_fails_on: Collection[int] = (), corrupt_residual: bool = False,
                 run_fails_on_ranks: Optional[Collection[int]] = None, fail_after_compute: bool = False):
        self.name = name
        self.priority = priority
        self.prepare_fails_on = frozenset(prepare_fails_on)
        self.run_fails_on = frozenset(run_fails_on)
        self.corrupt_residual = corrupt_residual
        self.run_fails_on_ranks = None if run_fails_on_ranks is None else frozenset(run_fails_on_ranks)
        self.fail_after_compute = fail_after_compute
        self.prepared = self.live = 0
        self.made: List[FaultWorkspace] = []

    def prepare(self, capacity, caps, group) -> FaultWorkspace:
        self.prepared += 1
        if caps.rank in self.prepare_fails_on:
            raise InjectedFault(f"{self.name}: injected prepare failure on rank {caps.rank}")
        ws = FaultWorkspace(self, group, caps.world_size)
        ws.rank = caps.rank
        return ws

    def run(self, ws, variant, spec, call) -> None:
        ws.runs += 1
        if ws.runs in self.run_fails_on and (self.run_fails_on_ranks is None or ws.rank in self.run_fails_on_ranks):
            if self.fail_after_compute:
                super().run(ws, variant, spec, call)
            _spoil(call.out)
            if self.corrupt_residual and call.residual_out is not None:
                _spoil(call.residual_out)
            raise InjectedFault(f"{self.name}: injected launch failure in call {ws.runs}")
        super().run(ws, variant, spec, call)


def _spoil(t: torch.Tensor) -> None:
    if t.element_size() == 1:  # FP8: write a bit pattern (a finite value, not the FP8 NaN)
        t.view(torch.uint8).fill_(0x5A)
    else:
        t.fill_(GARBAGE)


@contextlib.contextmanager
def registered(*backends: base.Backend) -> Iterator[None]:
    """Register ``backends`` for one block only (the registry is process-global)."""
    for b in backends:
        base.register(b)
    try:
        yield
    finally:
        for b in backends:
            base.unregister(b.name)


@contextlib.contextmanager
def raising_on_ranks(owner, attr: str, rank: int, ranks: Collection[int], error: BaseException,
                     after: bool = False) -> Iterator[None]:
    """Make ``owner.attr`` (a function or method) raise ``error`` on this process if ``rank`` is in ``ranks``;
    other ranks call the original. ``after=True`` runs the original first, so its side effects (and any
    collective inside it) happen before the raise. Restores the original on exit."""
    original = getattr(owner, attr)
    if rank not in ranks:
        yield
        return

    @functools.wraps(original)
    def failing(*args, **kwargs):
        if after:
            original(*args, **kwargs)
        raise error

    setattr(owner, attr, failing)
    try:
        yield
    finally:
        setattr(owner, attr, original)
