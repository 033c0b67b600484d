"""Local facts about this process's device: arch, name, host, peer access; and the probes backends use for their
own facts (symmetric memory, installed packages; see ``arfuse.probe.facts``). Never raises."""
from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from arfuse.core import settings


def hostname() -> str:
    """This host's name; ``ARFUSE_HOSTNAME`` overrides it (used to simulate multi-host groups in tests)."""
    return settings.text("ARFUSE_HOSTNAME") or socket.gethostname()


@dataclass(frozen=True)
class LocalDevice:
    """What one rank sees of its own device."""

    device_type: str
    index: Optional[int] = None
    name: Optional[str] = None
    sm: Optional[Tuple[int, int]] = None
    host: str = ""
    notes: Tuple[str, ...] = field(default_factory=tuple)


def has_module(name: str) -> bool:
    """Whether ``name`` is importable here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def symm_mem_reason() -> Optional[str]:
    """Why torch symmetric memory cannot be used here, or None."""
    if not torch.cuda.is_available():
        return "symm_mem: CUDA not available"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as e:
        return f"symm_mem: torch.distributed._symmetric_memory not importable ({e})"
    return None


def local_device(device: torch.device) -> LocalDevice:
    """Probe ``device`` (no collectives)."""
    host = hostname()
    if device.type != "cuda":
        return LocalDevice(device_type=device.type, host=host)
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        sm = tuple(torch.cuda.get_device_capability(index))
    except (RuntimeError, AssertionError) as e:
        return LocalDevice(device_type="cuda", host=host, notes=(f"cuda: {e}",))
    return LocalDevice(device_type="cuda", index=index, name=name, sm=sm, host=host)


def peer_access(local_index: int, peer_indices) -> Tuple[bool, Optional[str]]:
    """Whether this GPU can access every peer GPU (as the driver reports; backends verify for real)."""
    for peer in peer_indices:
        if peer == local_index:
            continue
        try:
            if not torch.cuda.can_device_access_peer(local_index, peer):
                return False, f"GPU {local_index} cannot access GPU {peer}"
        except (RuntimeError, AssertionError) as e:
            return False, f"peer access {local_index}->{peer}: {e}"
    return True, None
