"""The one Backend contract every path implements, the Workspace it owns, and the registry selection reads.

A backend joins arfuse by subclassing :class:`Backend` and calling :func:`register` at import time; the
selector and the executor never name backends.

Lifecycle, per fusion object:
  1. ``check(problem, caps, variant)`` - pure, no side effects: the reason it cannot run, or None.
  2. ``prepare(capacity, caps, group)`` - collective over ``group`` (every rank calls it), once, before any
     CUDA-graph capture; returns a Workspace or raises. The executor votes on the outcome so that all ranks
     keep or drop the backend together.
  3. ``run(ws, variant, spec, call)`` - writes the outputs of ``call`` (a :class:`~arfuse.core.types.FusedCall`)
     that ``spec`` names; returns nothing. Must be graph-capturable.
  4. ``ws.close()`` - idempotent; frees buffers.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from arfuse.core import settings
from arfuse.core.spec import CLASSIC_FEATURES, FEATURES, FusionSpec
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Problem

ALL_FEATURES = FEATURES
# A path the verification record does not vouch for on the code here now (see backends/verification.py) is
# refused unless this is set (for the verification run itself): a kernel that compiled is not a kernel that was
# checked against the float64 reference.
ALLOW_UNVERIFIED_ENV = "ARFUSE_ALLOW_UNVERIFIED"


def allow_unverified() -> bool:
    return settings.switch(ALLOW_UNVERIFIED_ENV)


@dataclass(frozen=True)
class Support:
    """What a backend declares it can do; :meth:`Backend.check` tests a problem against it.

    ``features``: the :attr:`FusionSpec.features <arfuse.core.spec.FusionSpec.features>` it implements (a spec
    needing one it lacks is refused); the default is what the first four patterns need. Which of them are verified
    is not declared here: see :meth:`Backend.verified_sources`."""

    devices: FrozenSet[str]
    dtypes: FrozenSet[torch.dtype]
    features: FrozenSet[str] = CLASSIC_FEATURES
    world_sizes: Optional[FrozenSet[int]] = None  # None: any
    max_bytes: Optional[int] = None  # per call (tokens * hidden * itemsize); None: unlimited
    hidden_multiple: int = 1
    max_hidden: Optional[int] = None

    def reason(self, problem: Problem) -> Optional[str]:
        if problem.device_type not in self.devices:
            return f"device {problem.device_type} not supported (needs {'/'.join(sorted(self.devices))})"
        if problem.dtype not in self.dtypes:
            names = "/".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            return f"dtype {str(problem.dtype).replace('torch.', '')} not supported (needs {names})"
        missing = problem.spec.features - self.features
        if missing:
            return f"{problem.spec.name}: {', '.join(sorted(missing))} not supported"
        if self.world_sizes is not None and problem.world_size not in self.world_sizes:
            return f"world size {problem.world_size} not supported (needs one of {sorted(self.world_sizes)})"
        if problem.hidden_size % self.hidden_multiple:
            return f"hidden size {problem.hidden_size} is not a multiple of {self.hidden_multiple}"
        if self.max_hidden is not None and problem.hidden_size > self.max_hidden:
            return f"hidden size {problem.hidden_size} exceeds {self.max_hidden}"
        if self.max_bytes is not None and problem.nbytes > self.max_bytes:
            return f"{problem.nbytes} bytes per call exceeds the backend limit of {self.max_bytes}"
        return None


class IndexGuard:
    """A host-mapped record that a GPU call met a MoE index outside ``[0, P)`` (the kernels read no row for it), set
    without a host sync: by a kernel through :attr:`ptr`, or by torch ops through :meth:`record`.

    Raising at the next call would put the ranks out of step (only the ranks that saw the index would raise, the
    others would wait in their collective), so the record is reported by :meth:`message` to ``check_health()``."""

    def __init__(self, device: torch.device):
        self.host = torch.zeros(4, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._view = self.host.numpy()
        self.ptr = self.host.data_ptr()

    def record(self, bad: torch.Tensor) -> None:
        """Note ``bad`` (a boolean tensor: any True marks an out-of-range index). Graph-safe."""
        torch.maximum(self.flag, bad.any().to(torch.int32).reshape(1), out=self.flag)
        self.host[:1].copy_(self.flag, non_blocking=True)

    def message(self) -> Optional[str]:
        if self._view[0] == 0:
            return None
        return ("moe_finalize_residual_rmsnorm: permuted_idx held an index outside [0, P) (the rows of expert_out) "
                "in an earlier call; that row added nothing, so that call's result was wrong")


class Workspace:
    """Buffers a backend owns for one fusion object. Subclasses free them in ``_release``.

    ``index_guard``: an :class:`IndexGuard` on GPU workspaces of backends that run the MoE prologue, else None."""

    index_guard: Optional[IndexGuard] = None

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        """Free the buffers. Idempotent; safe at interpreter exit."""
        if self.closed:
            return
        self.closed = True
        self._release()

    def _release(self) -> None:
        pass

    def input_buffer(self, variant: str, num_tokens: int) -> Optional[torch.Tensor]:
        """A tensor the caller may write its input into so ``variant`` skips its copy-in, or None."""
        return None

    def raise_if_failed(self) -> None:
        """Raise the error a previous asynchronous launch recorded (e.g. a peer timeout), if any."""

    def input_error(self) -> Optional[str]:
        """What a previous asynchronous launch found wrong with its inputs (a MoE index out of range), or None."""
        return self.index_guard.message() if self.index_guard is not None else None


class Backend(abc.ABC):
    """One way to compute the fused op. Subclasses set ``name``, ``variants``, ``support`` and ``priority``."""

    name: str = ""
    variants: Tuple[str, ...] = ("default",)
    support: Support
    priority: int = 100  # static preference when neither a tuned table nor the defaults decide; lower wins
    needs_prepare_vote: bool = True  # False for paths whose prepare cannot fail on one rank alone
    multi_host: bool = False  # True if it runs on ranks spread over hosts (needs neither P2P nor shared memory)

    def check(self, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
        """Why this backend/variant cannot run ``problem`` on ``caps``, or None. Pure.

        Its dependence on ``problem.num_tokens`` must be monotone: refusing n tokens means refusing every larger
        count (selection finds each path's largest size by bisection).
        """
        if variant not in self.variants:
            return f"unknown variant {variant!r} (has {', '.join(self.variants)})"
        return (self.support.reason(problem) or self.check_group(caps) or self.check_variant(problem, caps, variant)
                or self.unverified_reason(problem, caps, variant))

    def verified_sources(self, variant: str) -> Optional[Tuple[str, ...]]:
        """The modules whose code the verification record's evidence for ``variant`` must have checked (their
        ``arfuse.kernels`` imports are followed); None for a path that needs no GPU evidence (the torch
        reference)."""
        return None

    def unverified_reason(self, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
        """Why the verification record does not vouch for ``problem`` on ``variant`` with the code here now, or None
        (also None when ``ARFUSE_ALLOW_UNVERIFIED`` is set, as agreed in ``caps``)."""
        modules = self.verified_sources(variant)
        if modules is None:
            return None
        allowed = allow_unverified() if caps.allow_unverified is None else caps.allow_unverified
        if allowed:
            return None
        from arfuse.backends import verification

        key = self.name if variant in ("", "default") else f"{self.name}/{variant}"
        reason = verification.verdict(key, modules).reason(problem.spec.features, problem.spec.name,
                                                           problem.world_size, problem.dtype,
                                                           verification.triton_version())
        return f"{reason} ({ALLOW_UNVERIFIED_ENV}=1 runs it)" if reason else None

    def check_group(self, caps: GroupCaps) -> Optional[str]:
        """Group-level requirements (P2P, arch, installed packages). Pure."""
        return None

    def check_variant(self, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
        """Variant-level limits (e.g. a one-shot size cap). Pure."""
        return None

    @abc.abstractmethod
    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> Workspace:
        """Allocate and exchange buffers for ``capacity``. Collective over ``group``; not graph-safe."""

    @abc.abstractmethod
    def run(self, ws: Workspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        """Compute ``spec`` into the outputs of ``call``. ``call.residual`` may be ``call.residual_out`` itself
        (in-place mode). Collective; graph-capturable."""

    def free_idle(self) -> int:
        """Free what this backend keeps for reuse after its fusion objects closed; returns how many buffers."""
        return 0


_REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend instance to the registry (replacing one of the same name) and return it."""
    if not backend.name:
        raise ValueError("register: backend.name must be a non-empty string")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(_REGISTRY) or 'none'}") from None


def registered() -> List[Backend]:
    """Registered backends in registration order."""
    return list(_REGISTRY.values())
