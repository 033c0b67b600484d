"""The ``torch.library`` op every public call goes through, so models compile with ``fullgraph=True``.

``arfuse::fused_`` writes its outputs into caller-allocated tensors (declared mutated) and returns nothing; the
fusion object is passed as an integer handle into a registry of live executors. In-place residual mode passes
``residual=None`` and the residual tensor as ``residual_out`` (read, then overwritten), so no argument aliases
another.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Dict, Optional

import torch

from arfuse.core.types import Pattern
from arfuse.runtime.executor import Executor

_executors: "Dict[int, weakref.ref[Executor]]" = {}
_next_handle = itertools.count(1)
_lock = threading.Lock()


def register_executor(executor: Executor) -> int:
    """Give ``executor`` a handle the op can carry; it is dropped when the executor is garbage collected."""
    handle = next(_next_handle)
    with _lock:
        _executors[handle] = weakref.ref(executor, lambda _ref, h=handle: _executors.pop(h, None))
    return handle


def lookup(handle: int) -> Executor:
    ref = _executors.get(handle)
    executor = ref() if ref is not None else None
    if executor is None or executor.closed:
        raise ValueError(f"arfuse: fusion handle {handle} is closed or was never created")
    return executor


@torch.library.custom_op("arfuse::fused_", mutates_args=("out", "residual_out"))
def fused_(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
           scale: Optional[torch.Tensor], eps: float, handle: int, pattern: int, out: torch.Tensor,
           residual_out: Optional[torch.Tensor]) -> None:
    """allreduce(x) [+ residual] [-> RMSNorm * weight [-> FP8 with scale]] into ``out`` / ``residual_out``."""
    if residual is None and residual_out is not None:
        residual = residual_out
    lookup(handle).run(Pattern(pattern), x, residual, weight, eps, scale, out, residual_out)


@fused_.register_fake
def _fused_fake(x, residual, weight, scale, eps, handle, pattern, out, residual_out) -> None:
    return None


def call(executor: Executor, handle: int, pattern: Pattern, x: torch.Tensor, residual, weight, scale, eps: float,
         out: torch.Tensor, residual_out) -> None:
    """Run one fused call: through the registered op while tracing (compile, export, fake tensors), straight to
    the executor in eager mode, where the op's dispatch would cost ~100 µs of Python per call."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        fused_(x, residual, weight, scale, eps, handle, int(pattern), out, residual_out)
    else:
        executor.run(pattern, x, residual if residual is not None else residual_out, weight, eps, scale, out,
                     residual_out)
