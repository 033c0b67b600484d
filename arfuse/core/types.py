"""Frozen value types shared by every layer: what a call asks for, what a group can do, what will run."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch


class Pattern(enum.IntEnum):
    """The fused operations arfuse offers (an int enum so it can cross a ``torch.library`` op boundary)."""

    ALLREDUCE = 0
    """``out = allreduce(x)``"""
    RMSNORM = 1
    """``out = rmsnorm(allreduce(x)) * weight``"""
    RESIDUAL_RMSNORM = 2
    """``residual_out = allreduce(x) + residual; out = rmsnorm(residual_out) * weight``"""
    RESIDUAL_RMSNORM_FP8 = 3
    """as RESIDUAL_RMSNORM, with ``out = fp8_e4m3(clamp(norm / scale))``"""

    @property
    def has_residual(self) -> bool:
        return self in (Pattern.RESIDUAL_RMSNORM, Pattern.RESIDUAL_RMSNORM_FP8)

    @property
    def has_norm(self) -> bool:
        return self is not Pattern.ALLREDUCE


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(frozen=True)
class Capacity:
    """What a fusion object was built for; backends size their workspaces from it."""

    max_tokens: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    timeout_s: float = 10.0  # bound on any wait for a peer inside a kernel

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def max_bytes(self) -> int:
        return self.max_tokens * self.hidden_size * self.itemsize


@dataclass(frozen=True)
class Problem:
    """One call's shape: everything selection may depend on, and nothing that differs between ranks."""

    pattern: Pattern
    num_tokens: int
    hidden_size: int
    dtype: torch.dtype
    device_type: str
    world_size: int

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.hidden_size * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class GroupCaps:
    """Facts about a process group that all its ranks agree on (built by ``probe.group``).

    ``flashinfer`` holds the (immutable) FlashInfer probe result, or None when not probed.
    ``notes`` records why a capability is missing, e.g. ``("p2p: rank 1 cannot access rank 0",)``.
    """

    world_size: int
    rank: int
    device_type: str
    dist_backend: Optional[str] = None
    gpu_name: Optional[str] = None
    sm: Optional[Tuple[int, int]] = None
    single_host: bool = True
    p2p: bool = False
    symm_mem: bool = False
    triton: bool = False
    flashinfer: Any = None
    notes: Tuple[str, ...] = field(default_factory=tuple)

    def note(self, prefix: str) -> str:
        """The first note that starts with ``prefix``, or a generic text."""
        for n in self.notes:
            if n.startswith(prefix):
                return n
        return f"{prefix}: not available"


@dataclass(frozen=True)
class Plan:
    """What will run for one (pattern, token count): a backend, its variant, and why it was chosen."""

    backend: str
    variant: str
    reason: str = ""
    fallback: bool = False  # True when the requested path could not run and this plan replaces it

    @property
    def key(self) -> str:
        return self.backend if self.variant in ("", "default") else f"{self.backend}/{self.variant}"
