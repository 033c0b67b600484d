"""Calls of the public ops on a :class:`arfuse.verify.Case` and output comparisons for the tests; ``fused_call`` (a
``FusedCall`` built straight from a case) lives in :mod:`arfuse.testing.calls`."""
from __future__ import annotations

from typing import Dict

import torch

from arfuse import verify
from arfuse.core import operands
from arfuse.core.quant import FP8Static
from arfuse.core.spec import FusionSpec
from arfuse.testing.calls import fused_call  # noqa: F401


def public_call(fusion, spec: FusionSpec, case: verify.Case, mode: str = "fresh", device="cpu",
                scale_tensor: bool = False) -> Dict[str, torch.Tensor]:
    """Run ``spec`` through its public op on rank 0's inputs of ``case`` (fresh tensors each call); ``mode``:
    ``fresh`` (arfuse allocates the outputs), ``given`` (caller outputs, poisoned) or ``inplace``;
    ``scale_tensor``: a static FP8 scale as a one-element tensor instead of a float. Returns every output by name
    (checking that caller outputs and the in-place residual are the tensors returned)."""
    c = case
    residual = c.residual(device) if spec.residual else None
    weight = c.weight(device) if spec.norm else None
    offset = c.weight_offset if spec.weight_offset else 0.0
    outs = {}
    if mode == "given":
        outs = operands.allocate_all(spec, c.tokens, c.hidden, c.dtype, device)
        for t in outs.values():
            t.fill_(-1) if t.dtype == torch.int32 else t.view(torch.uint8).fill_(0x7F)
    inplace = mode == "inplace"
    res_kw = {} if inplace or not spec.residual else {"residual_out": outs.get("residual_out")}
    quant = verify.quant_arg(spec, c) if spec.quant else None
    if scale_tensor and isinstance(quant, FP8Static):
        quant = FP8Static(torch.tensor([c.scale], device=device))
    if spec.moe:
        r = fusion.moe_finalize_residual_rmsnorm(
            c.expert_out(0, device), c.permuted_idx(0, device), c.expert_scales(0, device), residual, weight, c.eps,
            weight_offset=offset, shared_expert_out=c.shared_expert_out(0, device) if spec.shared_expert else None,
            quant=quant, also_norm=spec.also_norm, inplace=inplace, quant_out=outs.get("out") if spec.quant else None,
            scale_out=outs.get("scale_out"), norm_out=outs.get("norm_out") if spec.quant else outs.get("out"),
            **res_kw)
        got = {"out": r.quant if spec.quant else r.norm, "residual_out": r.residual, "norm_out": r.norm,
               "scale_out": r.scale}
    elif not spec.norm:
        got = {"out": fusion.all_reduce(c.x(0, device), out=outs.get("out"))}
    elif not spec.residual:
        got = {"out": fusion.rmsnorm(c.x(0, device), weight, c.eps, weight_offset=offset, out=outs.get("out"))}
    elif not spec.quant:
        norm, res = fusion.residual_rmsnorm(c.x(0, device), residual, weight, c.eps, weight_offset=offset,
                                            norm_out=outs.get("out"), inplace=inplace, **res_kw)
        got = {"out": norm, "residual_out": res}
    else:
        r = fusion.residual_rmsnorm_quant(c.x(0, device), residual, weight, c.eps, quant=quant, weight_offset=offset,
                                          also_norm=spec.also_norm, inplace=inplace, quant_out=outs.get("out"),
                                          scale_out=outs.get("scale_out"), norm_out=outs.get("norm_out"), **res_kw)
        got = {"out": r.quant, "residual_out": r.residual, "norm_out": r.norm, "scale_out": r.scale}
    if inplace:
        assert got["residual_out"] is residual
    for name, t in outs.items():
        assert got[name] is t, name  # the caller's own tensor is returned
    return {k: got[k] for k in operands.names(spec)}


def same_outputs(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], label: str) -> None:
    """Assert two calls' outputs are bitwise identical (dtypes, shapes, strides and bytes)."""
    assert a.keys() == b.keys(), label
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), (label, k)
        if x.element_size() == 1:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), (label, k)
