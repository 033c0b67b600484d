"""Greedy decoding with the KV cache (prefill, then graph-captured decode steps) and the agreement check
between norm paths: same logits within a dtype tolerance, same greedy tokens.

Paths are compared under teacher forcing: every path is fed the reference path's tokens, so one near-tie cannot
derail the rest of the comparison. A greedy token may differ from the reference only at a near-tie: where the
reference's top-1 margin over the other pick is within 4x the path's overall relative logit error times the
row's RMS (with random weights top-2 margins are small, so some flips are expected in bf16). A flip with a
larger margin means the error is concentrated somewhere, which the averaged error alone would hide.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from arfuse.models.llama import Transformer
from arfuse.models.timing import DecodeStep

# ||logits - reference|| / ||reference|| accepted between two norm paths (or TP degrees) of one model: bf16
# rounding of the residual stream differs with the allreduce's summation order and compounds over layers.
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, steps: int,
           forced: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``prompt`` (batch, P), then decode ``steps - 1`` tokens with one captured decode step.

    Returns ``(logits, tokens)``: float32 (steps, batch, vocab) on the CPU and the greedy picks (steps, batch).
    ``forced`` (steps, batch) feeds those tokens instead of the model's own picks. Collective.
    """
    if steps < 1:
        raise ValueError(f"greedy: steps must be >= 1, got {steps}")
    batch, prompt_len = prompt.shape
    model.setup_caches(batch, prompt_len + steps - 1)
    logits = [model(prompt).float().cpu()]
    step = None
    try:
        for i in range(1, steps):
            fed = (forced[i - 1] if forced is not None else logits[-1].argmax(-1)).view(batch, 1)
            pos = prompt_len + i - 1
            if step is None:
                step = DecodeStep(model, fed, pos)
            logits.append(step(fed.to(step.tokens.device), pos).float().cpu())
    finally:
        if step is not None:
            step.close()
    stacked = torch.stack(logits)
    return stacked, stacked.argmax(-1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 on ``out``'s device (inf if ``out`` is not finite)."""
    out, ref = out.double(), ref.to(device=out.device, dtype=torch.float64)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def compare(ref_logits: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype) -> dict:
    """Agreement of one path's ``logits`` with the reference's (both from :func:`greedy` on the same tokens)."""
    err = rel_err(logits, ref_logits)
    ref_pick, pick = ref_logits.argmax(-1), logits.argmax(-1)
    differ = (ref_pick != pick).nonzero().tolist()
    ties = 0
    for s, b in differ:
        row = ref_logits[s, b].double()
        margin = (row[ref_pick[s, b]] - row[pick[s, b]]).item()
        if margin <= 4 * err * row.pow(2).mean().sqrt().item():
            ties += 1
    tolerance = LOGITS_TOLERANCE[dtype]
    return {"logits_rel_err": err, "tolerance": tolerance, "tokens_equal": ref_pick.numel() - len(differ),
            "tokens": ref_pick.numel(), "near_ties": ties, "ok": err <= tolerance and ties == len(differ)}


def identical_across_ranks(logits: torch.Tensor) -> bool:
    """Whether every rank computed bitwise the same ``logits`` (a CPU tensor). Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    gathered: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, hashlib.sha256(logits.numpy().tobytes()).hexdigest())
    return len(set(gathered)) == 1
