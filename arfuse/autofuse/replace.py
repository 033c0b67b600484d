"""What replaces a match: per arfuse op, the function Inductor traces into the graph in place of the matched
nodes (it returns the pattern's outputs, in order) and the matched nodes it takes."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from arfuse.autofuse import ops  # noqa: F401  (registers torch.ops.arfuse.autofused_*)

Build = Callable[[Mapping[str, Any], int], Tuple[Callable, List[Any]]]


@dataclasses.dataclass(frozen=True)
class Replacement:
    op: str
    build: Build
    note: Callable[[Mapping[str, Any]], str] = lambda kw: ""


def _scaled(x: torch.Tensor, multiplier) -> torch.Tensor:
    # allreduce is linear: sum(x * m) equals sum(x) * m up to rounding, so the scale moves before the call
    return x if multiplier is None else x * multiplier


def _residual_rmsnorm(kw, max_tokens):
    eps, group, m = float(kw["eps"]), kw["group"], kw.get("multiplier")

    def fused(x, residual, weight):
        return torch.ops.arfuse.autofused_residual_rmsnorm(_scaled(x, m), residual, weight, eps, group, max_tokens)

    return fused, [kw["x"], kw["residual"], kw["weight"]]


def _residual_rmsnorm_fp8(kw, max_tokens):
    eps, group, m, scale = float(kw["eps"]), kw["group"], kw.get("multiplier"), kw["scale"]
    if isinstance(scale, torch.fx.Node):
        def fused(x, residual, weight, scale_t):
            return torch.ops.arfuse.autofused_residual_rmsnorm_fp8(_scaled(x, m), residual, weight,
                                                                   scale_t.reshape(1), eps, group, max_tokens)

        return fused, [kw["x"], kw["residual"], kw["weight"], scale]

    def fused_const(x, residual, weight):
        scale_t = torch.full((1,), float(scale), dtype=torch.float32, device=x.device)
        return torch.ops.arfuse.autofused_residual_rmsnorm_fp8(_scaled(x, m), residual, weight, scale_t, eps,
                                                               group, max_tokens)

    return fused_const, [kw["x"], kw["residual"], kw["weight"]]


def _rmsnorm(kw, max_tokens):
    eps, group = float(kw["eps"]), kw["group"]

    def fused(x, weight):
        return torch.ops.arfuse.autofused_rmsnorm(x, weight, eps, group, max_tokens)

    return fused, [kw["x"], kw["weight"]]


def _all_reduce(kw, max_tokens):
    group = kw["group"]

    def fused(x):
        return torch.ops.arfuse.autofused_all_reduce(x, group, max_tokens)

    return fused, [kw["x"]]


def _scale_note(kw) -> str:
    m = kw.get("multiplier")
    return "" if m is None else (f"the allreduced branch's scale {m:g} is applied to the input before the fused "
                                 f"call (allreduce is linear; equal up to rounding)")


REPLACEMENTS: Dict[str, Replacement] = {
    r.op: r for r in (
        Replacement("residual_rmsnorm", _residual_rmsnorm, _scale_note),
        Replacement("residual_rmsnorm_fp8", _residual_rmsnorm_fp8, _scale_note),
        Replacement("rmsnorm", _rmsnorm),
        Replacement("all_reduce", _all_reduce),
    )
}
