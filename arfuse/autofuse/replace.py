"""What replaces a match: per arfuse op, the function Inductor traces into the graph in place of the matched
nodes (it returns the pattern's outputs, in order) and the matched nodes it takes."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from arfuse.autofuse import ops  # noqa: F401  (registers torch.ops.arfuse.autofused)
from arfuse.autofuse import explain, views
from arfuse.autofuse.checks import norm_input_val, val
from arfuse.core.spec import FusionSpec, Quant

Build = Callable[[Mapping[str, Any], int], Tuple[Callable, List[Any]]]


@dataclasses.dataclass(frozen=True)
class Replacement:
    op: str
    build: Build
    note: Callable[[Mapping[str, Any]], str] = lambda kw: ""


class _Inputs:
    """The replacement's inputs: matched nodes go in as traced arguments, constants stay Python values."""

    def __init__(self, kw: Mapping[str, Any], names):
        self.names = [n for n in names if isinstance(kw.get(n), torch.fx.Node)]
        self.nodes = [kw[n] for n in self.names]
        self.constants = {n: kw.get(n) for n in names if n not in self.names}

    def bind(self, args) -> Dict[str, Any]:
        return dict(self.constants, **dict(zip(self.names, args)))


def _scaled(x: torch.Tensor, multiplier) -> torch.Tensor:
    # allreduce is linear: sum(x * m) equals sum(x) * m up to rounding, so the scale moves before the call
    return x if multiplier is None else x * multiplier


def _fused(spec: FusionSpec, x, group: str, max_tokens: int, residual=None, weight=None, scale=None, eps=1.0,
           weight_offset: float = 0.0):
    """``torch.ops.arfuse.autofused`` for ``spec``: its outputs (out, then residual_out if the spec has one). ``eps``
    is a constant or a 0-d tensor the graph takes as an input (read at run time)."""
    eps, eps_t = (1e-6, eps) if isinstance(eps, torch.Tensor) else (float(eps), None)
    return torch.ops.arfuse.autofused(x, residual, weight, scale, None, None, None, eps, weight_offset, eps_t,
                                      spec.code, group, max_tokens)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The (tokens, hidden) view the fused call takes."""
    return t.reshape(-1, t.shape[-1])


def _norm_shape(kw):
    """How the norm's output is shaped back (``views.out_shape``): as the tensor input of that name, or a shape."""
    x, residual = val(kw["x"]), val(kw.get("residual"))
    return views.out_shape(norm_input_val(kw), [("residual", residual), ("x", x)])


def _shaped(t: torch.Tensor, shape, a: Dict[str, Any]) -> torch.Tensor:
    return t.view(a[shape].shape if isinstance(shape, str) else shape)


def _residual_in(a: Dict[str, Any]) -> torch.Tensor:
    """The residual the fused call takes: the graph's, plus the term the graph added to the sum first (if any)."""
    residual, addend = a["residual"], a.get("addend")
    return residual if addend is None else residual + addend.reshape(residual.shape)


def _residual_rmsnorm(kw, max_tokens, fp8: bool = False):
    group, offset = kw["group"], float(kw.get("weight_offset", 0.0))
    spec = FusionSpec(weight_offset=offset != 0.0, quant=Quant.FP8_STATIC if fp8 else Quant.NONE)
    inputs = _Inputs(kw, ("x", "residual", "weight", "eps", "multiplier", "addend") + (("scale",) if fp8 else ()))
    shape = _norm_shape(kw)

    def fused(*args):
        a = inputs.bind(args)
        scale = a.get("scale")
        if fp8:
            scale = (scale.reshape(1) if isinstance(scale, torch.Tensor)
                     else torch.full((1,), float(scale), dtype=torch.float32, device=a["x"].device))
        out, res = _fused(spec, _rows(_scaled(a["x"], a["multiplier"])), group, max_tokens,
                          residual=_rows(_residual_in(a)), weight=a["weight"], scale=scale, eps=a["eps"],
                          weight_offset=offset)
        return _shaped(out, shape, a), res.view(a["residual"].shape)

    return fused, inputs.nodes


def _residual_rmsnorm_fp8(kw, max_tokens):
    return _residual_rmsnorm(kw, max_tokens, fp8=True)


def _rmsnorm(kw, max_tokens):
    group, offset = kw["group"], float(kw.get("weight_offset", 0.0))
    spec = FusionSpec(residual=False, weight_offset=offset != 0.0)
    inputs = _Inputs(kw, ("x", "weight", "eps"))
    shape = _norm_shape(kw)

    def fused(*args):
        a = inputs.bind(args)
        out, = _fused(spec, _rows(a["x"]), group, max_tokens, weight=a["weight"], eps=a["eps"], weight_offset=offset)
        return _shaped(out, shape, a)

    return fused, inputs.nodes


def _all_reduce(kw, max_tokens):
    group, spec = kw["group"], FusionSpec(residual=False, norm=False)

    def fused(x):
        out, = _fused(spec, x, group, max_tokens)
        return out

    return fused, [kw["x"]]


def _scale_note(kw) -> str:
    notes = []
    m = kw.get("multiplier")
    if m is not None:
        shown = f"{m:g}" if isinstance(m, (int, float)) else "(a graph input)"
        notes.append(f"the allreduced branch's scale {shown} is applied to the input before the fused call "
                     f"(allreduce is linear; equal up to rounding)")
    addend = kw.get("addend")
    if addend is not None:
        notes.append(f"the term added to the sum ({explain.where(addend) or addend.name}) is added to the residual "
                     f"before the fused call (the additions reordered; equal up to rounding)")
    return "; ".join(notes)


REPLACEMENTS: Dict[str, Replacement] = {
    r.op: r for r in (
        Replacement("residual_rmsnorm", _residual_rmsnorm, _scale_note),
        Replacement("residual_rmsnorm_fp8", _residual_rmsnorm_fp8, _scale_note),
        Replacement("rmsnorm", _rmsnorm),
        Replacement("all_reduce", _all_reduce),
    )
}
