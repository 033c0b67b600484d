"""arfuse: one fast, trustworthy call for tensor-parallel allreduce + residual add + RMSNorm.

>>> import arfuse
>>> sorted(arfuse.__all__)[:3]
['AllReduceFusion', 'ArfuseError', 'BackendError']
"""
from arfuse import backends as _backends  # noqa: F401  (registers the backends)
from arfuse.api import AllReduceFusion, free_idle_workspaces
from arfuse.autofuse import compile, compile_report
from arfuse.core.counters import process_stats as stats
from arfuse.core.counters import strict
from arfuse.core.errors import ArfuseError, BackendError, FallbackError, PeerTimeoutError
from arfuse.core.types import Pattern, Plan
from arfuse.functional import all_reduce, residual_rmsnorm, rmsnorm
from arfuse.module import FusedAddRMSNorm

__version__ = "0.1.0"

__all__ = [
    "AllReduceFusion",
    "ArfuseError",
    "BackendError",
    "FallbackError",
    "FusedAddRMSNorm",
    "Pattern",
    "PeerTimeoutError",
    "Plan",
    "all_reduce",
    "compile",
    "compile_report",
    "free_idle_workspaces",
    "residual_rmsnorm",
    "rmsnorm",
    "stats",
    "strict",
]
