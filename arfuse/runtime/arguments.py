"""The fusion object's arguments checked on this rank before any collective: the constructor's (device, backend
name, timeout) and the introspection methods' (token count, pattern); and the strict-mode refusal, at
construction, of a named path that can never run."""
from __future__ import annotations

import math
from typing import Optional

import torch

from arfuse.backends import base
from arfuse.core import settings
from arfuse.core.counters import resolve_strict
from arfuse.core.errors import FallbackError
from arfuse.core.spec import FusionSpec
from arfuse.core.types import Pattern
from arfuse.probe import vote
from arfuse.runtime.executor import Executor
from arfuse.select import policy


def default_device(group) -> torch.device:
    """The current CUDA device under an NCCL group, else the CPU."""
    if vote.is_distributed(group) and "nccl" in str(torch.distributed.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def normalize_device(device) -> torch.device:
    """``device`` as a torch.device with its index; ValueError/TypeError naming ``device`` if it is not one this
    process can use (checked before any collective)."""
    op = "AllReduceFusion"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{op}: device must be a str, int or torch.device, got {type(device).__name__}")
    try:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{op}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{op}: device must be a cpu or cuda device, got {device}")
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise ValueError(f"{op}: device {device} cannot be used: {why}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{op}: device {device} does not exist: {count} CUDA device(s) visible")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def check_backend_name(requested) -> str:
    """``backend``: "auto", a registered name or "name/variant" (TypeError/ValueError naming it)."""
    if not isinstance(requested, str):
        raise TypeError(f"AllReduceFusion: backend must be a str, got {type(requested).__name__}")
    name, variant = policy.parse_request(requested)
    if name == policy.AUTO:
        return requested
    backend = base.get(name)  # ValueError listing the registered names
    if variant is not None and variant not in backend.variants:
        raise ValueError(f"AllReduceFusion: backend {name!r} has no variant {variant!r} "
                         f"(has {', '.join(backend.variants)})")
    return requested


def check_timeout(timeout_s) -> float:
    """``timeout_s`` (None: ``ARFUSE_TIMEOUT_S``) as a finite float > 0."""
    if timeout_s is None:
        timeout_s = settings.number("ARFUSE_TIMEOUT_S")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"AllReduceFusion: timeout_s must be a number, got {type(timeout_s).__name__}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"AllReduceFusion: timeout_s must be finite and > 0, got {timeout_s}")
    return float(timeout_s)


def check_requested_can_run(executor: Executor, requested: str, strict: Optional[bool]) -> None:
    """In strict mode, a named backend none of whose plans can run (every pattern and token count would fall
    back) is refused at construction, not at the first call. The plans are computed alike on every rank from the
    agreed capabilities, so every rank raises together."""
    if requested == policy.AUTO or not resolve_strict(strict):
        return
    reason = executor.never_runs()
    if reason is not None:
        raise FallbackError(policy.parse_request(requested)[0], reason)


def check_tokens(op: str, num_tokens, max_tokens: int) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"{op}: num_tokens must be an int, got {type(num_tokens).__name__}")
    if not 1 <= num_tokens <= max_tokens:
        raise ValueError(f"{op}: num_tokens must be in 1..{max_tokens}, got {num_tokens}")


def spec_arg(op: str, pattern) -> FusionSpec:
    if isinstance(pattern, FusionSpec):
        return pattern
    if isinstance(pattern, str):
        try:
            return Pattern[pattern.upper()].spec
        except KeyError:
            raise ValueError(f"{op}: pattern must be one of {', '.join(p.name.lower() for p in Pattern)} or a "
                             f"FusionSpec, got {pattern!r}") from None
    return Pattern(pattern).spec
