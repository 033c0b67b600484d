"""A :class:`~arfuse.core.types.FusedCall` of any spec built straight from a :class:`arfuse.verify.Case` (no fusion
object, no process group), with NaN-poisoned outputs: for driving a backend's ``run`` or a kernel launcher
directly and checking the result with :func:`arfuse.verify.output_errors`."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from arfuse import verify
from arfuse.core.spec import FusionSpec, Quant
from arfuse.core.types import FusedCall


def fused_call(spec: FusionSpec, case: verify.Case, device="cpu", rank: int = 0, inplace: bool = False,
               idx: torch.Tensor = None) -> Tuple[FusedCall, Dict[str, torch.Tensor]]:
    """(the call, its outputs by name) for rank ``rank``'s inputs of ``case``; ``inplace``: the residual is
    updated in place (``outputs["residual_out"]`` is the residual); ``idx`` replaces the MoE indices."""
    outputs = verify.poisoned_outputs(spec, case, device)
    residual = case.residual(device) if spec.residual else None
    if inplace and residual is not None:
        outputs["residual_out"] = residual
    moe = {}
    if spec.moe:
        x = case.expert_out(rank, device)
        moe = dict(expert_idx=case.permuted_idx(rank, device) if idx is None else idx.to(device),
                   expert_scales=case.expert_scales(rank, device),
                   shared=case.shared_expert_out(rank, device) if spec.shared_expert else None)
    else:
        x = case.x(rank, device)
    call = FusedCall(x, outputs["out"], residual=residual, weight=case.weight(device) if spec.norm else None,
                     eps=case.eps, weight_offset=case.weight_offset if spec.weight_offset else 0.0,
                     scale=(torch.tensor([case.scale], dtype=torch.float32, device=device)
                            if spec.quant is Quant.FP8_STATIC else None),
                     residual_out=outputs.get("residual_out"), norm_out=outputs.get("norm_out"),
                     scale_out=outputs.get("scale_out"), **moe)
    return call, outputs
