"""The fusion objects arfuse makes for callers that hold none - the functional forms (``arfuse.residual_rmsnorm``,
...) and the calls ``arfuse.compile`` puts into graphs - in one cache.

An object is kept per (process group, hidden size, dtype, device, backend, capacity rule) and made on first use;
``None`` names the default group, so ``group=None`` and ``group=dist.group.WORLD`` share one object, and two
groups of the same ranks (two communicators) have one each. Making one is collective: every rank must make the same calls in the same order (one construction at a time
per process). Two capacity rules: a growing object (``max_tokens=None``, the functional forms) is sized to the next
power of two of the tokens a call brings and regrown (at least doubled) when a call brings more, the outgrown one
staying open, for a thread still using it, until :func:`close_all`; a fixed one (``max_tokens=N``,
``arfuse.compile``) is sized N, and its caller runs larger calls another way. An object that was closed is
replaced.

On CUDA an object is made in a helper thread, so that its long-lived buffers do not come from the memory pool a
CUDA-graph tree routes the calling thread's allocations to during its warm-up run (found on one H200, torch 2.11:
"Detected 3 tensor(s) in the cudagraph pool not tracked as outputs" - the nccl scratch and the two index guards; a
side stream did not help, the pool takes the thread's allocations on any stream); never while a CUDA graph is
being captured.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch

import torch.distributed as dist

from arfuse.api import AllReduceFusion
from arfuse.probe import vote

_entries: Dict[tuple, Tuple[tuple, AllReduceFusion]] = {}  # key -> (the group's ranks, fusion object)
_retired: List[Tuple[tuple, AllReduceFusion]] = []  # (ranks, outgrown or replaced object): closed by close_all
_lock = threading.RLock()  # held across construction: one collective construction at a time per process


def _group(group):
    """``group``, or the default group for None (when torch.distributed is initialized)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def fusion_for(group, hidden: int, dtype: torch.dtype, device: torch.device, tokens: int = 1, *,
               backend: str = "auto", max_tokens: Optional[int] = None) -> AllReduceFusion:
    """The cached fusion object of ``group`` (None: the default group) for this shape; made (collectively) on
    first use, or regrown for ``tokens`` (see the module docstring for the capacity rules)."""
    group = _group(group)
    key = (group, hidden, dtype, device, backend, max_tokens)
    entry = _entries.get(key)  # the hit needs no lock: a dict read is atomic, and a cached object stays open
    if _serves(entry, tokens, max_tokens):
        return entry[1]
    with _lock:
        entry = _entries.get(key)
        if _serves(entry, tokens, max_tokens):
            return entry[1]
        ranks = vote.group_ranks(group)
        capacity = max_tokens
        if capacity is None:
            capacity = 1 << (max(tokens, 1) - 1).bit_length()
            if entry is not None and not entry[1].closed:
                capacity = max(capacity, entry[1].capacity.max_tokens * 2)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"arfuse: the fusion object for ranks {ranks} (hidden {hidden}, {dtype}, {device}) does not exist "
                f"yet, and creating one is collective and allocates, which a CUDA graph capture forbids: run once "
                f"eagerly at this size before capturing (torch.compile(mode='reduce-overhead') warms up by itself)")
        # made before the old one is retired: if construction raises, the cached object still serves
        fusion = _make(group, capacity, hidden, dtype, device, backend)
        _entries[key] = (ranks, fusion)
        if entry is not None:
            _retired.append(entry)
    return fusion


def cached_for(group, hidden: int, dtype: torch.dtype, device: torch.device, tokens: int,
               backend: str = "auto") -> Optional[AllReduceFusion]:
    """The cached growing object that serves this call, or None (nothing made, no lock taken)."""
    entry = _entries.get((_group(group), hidden, dtype, device, backend, None))
    return entry[1] if _serves(entry, tokens, None) else None


def _serves(entry, tokens: int, max_tokens: Optional[int]) -> bool:
    if entry is None or entry[1].closed:
        return False
    return max_tokens is not None or entry[1].capacity.max_tokens >= tokens


def _make(group, max_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
          backend: str) -> AllReduceFusion:
    def build() -> AllReduceFusion:
        return AllReduceFusion(group, max_tokens=max_tokens, hidden_size=hidden, dtype=dtype, device=device,
                               backend=backend)

    if device.type != "cuda":
        return build()
    torch.cuda.current_stream(device).synchronize()
    made: dict = {}

    def target() -> None:
        try:
            torch.cuda.set_device(device)
            made["fusion"] = build()
            torch.cuda.synchronize(device)
        except BaseException as e:  # re-raised in the caller's thread
            made["error"] = e

    worker = threading.Thread(target=target, name="arfuse-fusion", daemon=True)
    worker.start()
    worker.join()
    if "error" in made:
        raise made["error"]
    return made["fusion"]


def cached() -> List[AllReduceFusion]:
    """The cached objects (not the retired ones)."""
    return [fusion for _, fusion in _entries.values()]


def close_all(group: Optional[object] = None) -> None:
    """Close the cached and retired objects of ``group`` (None: of every group); the next call makes them anew.
    Not collective."""
    ranks = vote.group_ranks(group) if group is not None else None
    with _lock:
        keys = [k for k, (r, _) in _entries.items() if ranks is None or r == ranks]
        victims = [_entries.pop(k)[1] for k in keys]
        victims += [f for r, f in _retired if ranks is None or r == ranks]
        _retired[:] = [(r, f) for r, f in _retired if not (ranks is None or r == ranks)]
    for fusion in victims:
        fusion.close()
