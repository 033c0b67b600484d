"""One-off functional forms. Each call reuses a cached :class:`AllReduceFusion` per (group, shape, dtype,
device, backend), regrown to the next power of two when a call brings more tokens. Collective: every rank must
make the same calls in the same order (construction of a cached object is collective too).
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch

from arfuse.api import AllReduceFusion
from arfuse.probe import vote

_cache: Dict[tuple, AllReduceFusion] = {}
_lock = threading.Lock()


def _fusion_for(op: str, group, x, backend: str) -> AllReduceFusion:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D torch.Tensor (tokens, hidden)")
    key = (vote.group_ranks(group), x.shape[1], x.dtype, x.device, backend)
    with _lock:
        fusion = _cache.get(key)
    tokens = max(x.shape[0], 1)
    if fusion is not None and fusion.capacity.max_tokens >= tokens:
        return fusion
    capacity = 1 << (tokens - 1).bit_length()
    if fusion is not None:
        capacity = max(capacity, fusion.capacity.max_tokens * 2)
        fusion.close()
    fusion = AllReduceFusion(group, max_tokens=capacity, hidden_size=x.shape[1], dtype=x.dtype, device=x.device,
                             backend=backend)
    with _lock:
        _cache[key] = fusion
    return fusion


def residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                     group=None, backend: str = "auto", inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``AllReduceFusion.residual_rmsnorm`` without managing the object. Collective."""
    return _fusion_for("residual_rmsnorm", group, x, backend).residual_rmsnorm(x, residual, weight, eps,
                                                                              inplace=inplace)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, group=None,
            backend: str = "auto") -> torch.Tensor:
    """``AllReduceFusion.rmsnorm`` without managing the object. Collective."""
    return _fusion_for("rmsnorm", group, x, backend).rmsnorm(x, weight, eps)


def all_reduce(x: torch.Tensor, *, group=None, backend: str = "auto") -> torch.Tensor:
    """``AllReduceFusion.all_reduce`` without managing the object. Collective."""
    return _fusion_for("all_reduce", group, x, backend).all_reduce(x)


def close_all(group: Optional[object] = None) -> None:
    """Close the cached fusion objects (of one group, or all)."""
    ranks = vote.group_ranks(group) if group is not None else None
    with _lock:
        keys = [k for k in _cache if ranks is None or k[0] == ranks]
        victims = [_cache.pop(k) for k in keys]
    for fusion in victims:
        fusion.close()
