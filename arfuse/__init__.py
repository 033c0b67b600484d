"""arfuse: one fast, trustworthy call for tensor-parallel allreduce + residual add + RMSNorm.

>>> import arfuse
>>> sorted(arfuse.__all__)[:3]
['AllReduceFusion', 'ArfuseError', 'BackendError']
"""
from arfuse.core.requirements import require as _require

_require("torch")  # one line naming the version found and the one needed, before anything needs torch

from arfuse import backends as _backends  # noqa: F401  (registers the backends)
from arfuse.api import AllReduceFusion, free_idle_workspaces
from arfuse.autofuse import compile, compile_report
from arfuse.core.counters import process_stats as stats
from arfuse.core.counters import strict
from arfuse.core.errors import ArfuseError, BackendError, FallbackError, PeerTimeoutError
from arfuse.core.quant import FP8PerToken, FP8PerTokenGroup, FP8Static
from arfuse.core.types import FusedOutput, Pattern, Plan
from arfuse.functional import (all_reduce, moe_finalize_residual_rmsnorm, residual_rmsnorm, residual_rmsnorm_quant,
                               rmsnorm)
from arfuse.module import FusedAddRMSNorm

__version__ = "0.1.0"

__all__ = [
    "AllReduceFusion",
    "ArfuseError",
    "BackendError",
    "FP8PerToken",
    "FP8PerTokenGroup",
    "FP8Static",
    "FallbackError",
    "FusedAddRMSNorm",
    "FusedOutput",
    "Pattern",
    "PeerTimeoutError",
    "Plan",
    "all_reduce",
    "compile",
    "compile_report",
    "free_idle_workspaces",
    "moe_finalize_residual_rmsnorm",
    "residual_rmsnorm",
    "residual_rmsnorm_quant",
    "rmsnorm",
    "stats",
    "strict",
]
