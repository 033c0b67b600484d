"""Frozen value types shared by every layer: what a call asks for, what a group can do, what will run."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from arfuse.core import spec as _spec
from arfuse.core.spec import FusionSpec


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

    @property
    def spec(self) -> FusionSpec:
        """The :class:`~arfuse.core.spec.FusionSpec` this classic pattern names."""
        return _PATTERN_SPECS[self]


_PATTERN_SPECS = {Pattern.ALLREDUCE: _spec.ALLREDUCE, Pattern.RMSNORM: _spec.RMSNORM,
                  Pattern.RESIDUAL_RMSNORM: _spec.RESIDUAL_RMSNORM,
                  Pattern.RESIDUAL_RMSNORM_FP8: _spec.RESIDUAL_RMSNORM_FP8}


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
    """One call's shape: everything selection may depend on, and nothing that differs between ranks.
    ``spec`` may be given as a classic :class:`Pattern`. ``expert_rows``: a MoE finalize call's expert rows (the
    rows of ``expert_out``, which a backend may be limited by; the same on every rank of a TP group); 0 where
    unknown (the per-token-count plan tables) or not a MoE call."""

    spec: FusionSpec
    num_tokens: int
    hidden_size: int
    dtype: torch.dtype
    device_type: str
    world_size: int
    expert_rows: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.spec, Pattern):
            object.__setattr__(self, "spec", self.spec.spec)

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.hidden_size * torch.empty((), dtype=self.dtype).element_size()


DECLARED_FACTS: set = set()  # every fact name a registered source contributes (arfuse.probe.facts.contribute)


@dataclass(frozen=True)
class GroupCaps:
    """Facts about a process group that all its ranks agree on (built by ``probe.group``).

    ``facts``: what each backend contributed to the probe (``arfuse.probe.facts``), by its name: ``{backend:
    {fact: agreed value}}``; :meth:`fact` reads one by name, and so does attribute access (``caps.triton``) for a
    name a registered source declares (any other name is an AttributeError, as for any object). A fact no backend contributed reads None: unknown, which every check treats as
    missing. ``notes`` records why a capability is missing, e.g. ``("p2p: rank 1 cannot access rank 0",)``.

    >>> import arfuse.backends  # registers the backends' fact sources
    >>> caps = GroupCaps(2, 0, "cuda", facts={"triton_symm": {"symm_mem": True}})
    >>> caps.fact("symm_mem"), caps.symm_mem, caps.triton, caps.fact("multicast")
    (True, True, None, None)
    """

    world_size: int
    rank: int
    device_type: str
    dist_backend: Optional[str] = None
    gpu_name: Optional[str] = None
    sm: Optional[Tuple[int, int]] = None
    single_host: bool = True
    p2p: bool = False
    facts: Dict[str, Dict[str, Any]] = field(default_factory=dict, hash=False)
    notes: Tuple[str, ...] = field(default_factory=tuple)
    allow_unverified: Optional[bool] = None  # agreed at construction (ARFUSE_ALLOW_UNVERIFIED); None: read it

    def fact(self, name: str, default: Any = None) -> Any:
        """The agreed fact ``name`` from whichever backend contributed it, else ``default`` (None: unknown, which
        every check treats as missing)."""
        for values in self.facts.values():
            if name in values:
                return values[name]
        return default

    def __getattr__(self, name: str) -> Any:
        # only for names that are not fields: a fact some source declared (None where none contributed it here)
        if name.startswith("_") or name not in DECLARED_FACTS or "facts" not in self.__dict__:
            raise AttributeError(f"GroupCaps has no field or declared fact {name!r}")
        return self.fact(name)

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


class FusedCall:
    """One call's tensors and scalars by slot (the slots of :mod:`arfuse.core.operands`), as every backend's
    ``run`` receives them once the preparation step (:mod:`arfuse.core.prepare`) has checked and completed it.

    ``x``: this rank's input (tokens, hidden), or the permuted expert rows (P, hidden) for the MoE prologue, with
    ``expert_idx`` int32 (tokens, top_k), ``expert_scales`` (tokens, top_k) and optional ``shared`` (tokens,
    hidden). ``out``: the allreduced sum (no norm), the quantized output (a quantization) or the norm.
    ``residual`` is ``residual_out`` itself in place. ``norm_out``: the norm besides a quantized ``out``
    (``also_norm``). ``scale``: the static FP8 scale (1-element float32); ``scale_out``: dynamic scales.
    """

    __slots__ = ("x", "residual", "weight", "eps", "weight_offset", "scale", "expert_idx", "expert_scales",
                 "shared", "out", "residual_out", "norm_out", "scale_out", "num_tokens")

    def __init__(self, x, out, *, residual=None, weight=None, eps: float = 1e-6, weight_offset: float = 0.0,
                 scale=None, expert_idx=None, expert_scales=None, shared=None, residual_out=None, norm_out=None,
                 scale_out=None):
        self.x, self.out, self.residual, self.weight, self.eps = x, out, residual, weight, eps
        self.weight_offset, self.scale, self.expert_idx, self.expert_scales = weight_offset, scale, expert_idx, \
            expert_scales
        self.shared, self.residual_out, self.norm_out, self.scale_out = shared, residual_out, norm_out, scale_out
        try:  # the preparation step sets it for the public ops' calls, whose x may be anything
            self.num_tokens = (expert_idx if expert_idx is not None else x).shape[0]
        except (AttributeError, IndexError, TypeError):
            self.num_tokens = 0

    @property
    def inplace(self) -> bool:
        return self.residual is not None and self.residual is self.residual_out


class FusedOutput(NamedTuple):
    """What the quantizing and MoE ops return; fields a call does not write are None.

    ``quant``: the FP8 output; ``scale``: its scales (dynamic quantizations: float32 (tokens, groups) or packed
    UE8M0 int32; static: the scale tensor used); ``residual``: the updated residual; ``norm``: the norm in the
    input dtype (without a quantization, or with ``also_norm=True``)."""

    quant: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    norm: Optional[torch.Tensor]
