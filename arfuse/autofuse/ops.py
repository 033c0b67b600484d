"""The ops the fusion pass puts into a compiled graph, and the fusion objects behind them.

Each op is functional (new outputs, no mutation) with a fake implementation, and carries the process-group name
the matched allreduce carried. Its eager implementation resolves the group, gets or creates the
:class:`~arfuse.AllReduceFusion` for (group ranks, hidden size, dtype, device, capacity) and calls its public
method. Creation is collective: it happens at the first run of the compiled graph, which every rank runs in the
same order, and never during CUDA-graph capture. A call with more tokens than the capacity runs the same math
unfused (``torch.distributed.all_reduce``, then add + RMSNorm in torch), counted and logged once.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from arfuse.api import AllReduceFusion
from arfuse.core.counters import Counters, log_once, resolve_strict
from arfuse.core.errors import FallbackError
from arfuse.core.math import quantize_fp8, rmsnorm_fp32
from arfuse.core.types import FP8_DTYPE
from arfuse.probe import vote

Tensor = torch.Tensor
UNFUSED_PATH = "autofuse/unfused (over max_tokens)"

_fusions: Dict[tuple, Tuple[object, AllReduceFusion]] = {}  # key -> (process group, fusion object)
_lock = threading.RLock()  # held across construction: one collective construction at a time per process
counters = Counters()  # this module's own fallbacks; part of arfuse.stats() like every fusion object's


def _resolve_group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _create(group, max_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> AllReduceFusion:
    """Build the fusion object; on CUDA in a helper thread, so that its long-lived buffers do not come from the
    memory pool a CUDA-graph tree routes this thread's allocations to during its warm-up run (found on one H200,
    torch 2.11: "Detected 3 tensor(s) in the cudagraph pool not tracked as outputs" - the nccl scratch and the two
    index guards; a side stream did not help, the pool takes the thread's allocations on any stream)."""
    def build() -> AllReduceFusion:
        return AllReduceFusion(group, max_tokens=max_tokens, hidden_size=hidden, dtype=dtype, device=device)

    if device.type != "cuda":
        return build()
    torch.cuda.current_stream(device).synchronize()
    made: dict = {}

    def target() -> None:
        try:
            torch.cuda.set_device(device)
            made["fusion"] = build()
            torch.cuda.synchronize(device)
        except BaseException as e:  # re-raised in the caller's thread
            made["error"] = e

    worker = threading.Thread(target=target, name="arfuse-compile-fusion", daemon=True)
    worker.start()
    worker.join()
    if "error" in made:
        raise made["error"]
    return made["fusion"]


def fusion_for(group_name: str, hidden: int, dtype: torch.dtype, device: torch.device,
               max_tokens: int) -> Tuple[object, AllReduceFusion]:
    """The cached (group, fusion object) for this call's shape; created (collectively) on first use."""
    group = _resolve_group(group_name)
    key = (group_name, hidden, dtype, device, max_tokens)
    cached = _fusions.get(key)
    if cached is not None and cached[0] is group and not cached[1].closed:
        return cached
    with _lock:
        cached = _fusions.get(key)
        if cached is not None and cached[0] is group and not cached[1].closed:
            return cached
        if _capturing(device):
            raise RuntimeError(
                f"arfuse.compile: the fusion object for group {group_name!r} (ranks {vote.group_ranks(group)}, "
                f"hidden {hidden}, {dtype}, {device}) does not exist yet, and creating one is collective and "
                f"allocates, which a CUDA graph capture forbids: run the compiled model once eagerly at this size "
                f"before capturing (torch.compile(mode='reduce-overhead') warms up by itself)")
        fusion = _create(group, max_tokens, hidden, dtype, device)
        _fusions[key] = (group, fusion)
        return group, fusion


def _like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A fake output as the real ops return theirs: contiguous, whatever ``x``'s strides (empty_like would keep a
    transposed input's)."""
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


def close_all() -> None:
    """Close every fusion object the compiled graphs created (the next call creates them again). Not
    collective."""
    with _lock:
        victims = [fusion for _, fusion in _fusions.values()]
        _fusions.clear()
    for fusion in victims:
        fusion.close()


def _flat(t: Tensor, hidden: int) -> Tensor:
    return t.reshape(-1, hidden).contiguous()


def _over_capacity(op: str, tokens: int, max_tokens: int) -> None:
    reason = f"{op}: {tokens} tokens > max_tokens {max_tokens} of arfuse.compile: ran unfused"
    if resolve_strict(None):
        raise FallbackError("arfuse.compile", reason)
    counters.count_fallback(reason)
    counters.count_call(UNFUSED_PATH)
    log_once(f"autofuse-capacity:{op}:{max_tokens}",
             f"arfuse: {reason} (raise arfuse.compile(..., max_tokens=) to fuse calls this large)")


def _unfused(x2: Tensor, residual2: Optional[Tensor], weight: Optional[Tensor], eps: float, weight_offset: float,
             scale: Optional[Tensor], group, out_dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """arfuse's math (``arfuse.core.math``: add and norm in fp32) after a plain ``torch.distributed.all_reduce``."""
    summed = x2.clone()
    if vote.world_size(group) > 1:
        dist.all_reduce(summed, group=group)
    if weight is None:
        return summed, None
    s = summed.float() if residual2 is None else summed.float() + residual2.float()
    norm = rmsnorm_fp32(s, weight, eps, weight_offset)
    out = (quantize_fp8(norm, scale) if scale is not None else norm).to(out_dtype)
    return out, None if residual2 is None else s.to(x2.dtype)


def _eps(eps: float, eps_t: Optional[Tensor]) -> float:
    # a graph that takes eps as an input (dynamic=True does that to float attributes) passes a 0-d CPU tensor
    return eps if eps_t is None else float(eps_t)


def _residual_call(op: str, x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float,
                   scale: Optional[Tensor], group_name: str, max_tokens: int) -> Tuple[Tensor, Tensor]:
    hidden = x.shape[-1]
    x2, r2, weight = _flat(x, hidden), _flat(residual, hidden), weight.contiguous()
    group, fusion = fusion_for(group_name, hidden, x.dtype, x.device, max_tokens)
    if x2.shape[0] > max_tokens:
        _over_capacity(op, x2.shape[0], max_tokens)
        out, res = _unfused(x2, r2, weight, eps, weight_offset, scale, group,
                            FP8_DTYPE if scale is not None else x.dtype)
    elif scale is None:
        out, res = fusion.residual_rmsnorm(x2, r2, weight, eps, weight_offset=weight_offset)
    else:
        out, res = fusion.residual_rmsnorm_fp8(x2, r2, weight, scale, eps, weight_offset=weight_offset)
    return out.view(x.shape), res.view(x.shape)


# -- the ops -----------------------------------------------------------------------------------------------------

@torch.library.custom_op("arfuse::autofused_residual_rmsnorm", mutates_args=())
def autofused_residual_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, eps_t: Optional[Tensor],
                               weight_offset: float, group_name: str, max_tokens: int) -> Tuple[Tensor, Tensor]:
    """``(rmsnorm(allreduce(x) + residual) * (weight + weight_offset), allreduce(x) + residual)`` over the group
    ``group_name``; ``x`` of any shape ``(..., hidden)``. ``eps_t``, if given, holds eps (0-d, CPU)."""
    return _residual_call("residual_rmsnorm", x, residual, weight, _eps(eps, eps_t), weight_offset, None,
                          group_name, max_tokens)


@autofused_residual_rmsnorm.register_fake
def _(x, residual, weight, eps, eps_t, weight_offset, group_name, max_tokens):
    return _like(x), _like(x)


@torch.library.custom_op("arfuse::autofused_residual_rmsnorm_fp8", mutates_args=())
def autofused_residual_rmsnorm_fp8(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor, eps: float,
                                   eps_t: Optional[Tensor], weight_offset: float, group_name: str,
                                   max_tokens: int) -> Tuple[Tensor, Tensor]:
    """As ``autofused_residual_rmsnorm`` with the normed output quantized to FP8 e4m3 by the static
    per-tensor ``scale`` (a 1-element float32 tensor)."""
    return _residual_call("residual_rmsnorm_fp8", x, residual, weight, _eps(eps, eps_t), weight_offset, scale,
                          group_name, max_tokens)


@autofused_residual_rmsnorm_fp8.register_fake
def _(x, residual, weight, scale, eps, eps_t, weight_offset, group_name, max_tokens):
    return _like(x, FP8_DTYPE), _like(x)


@torch.library.custom_op("arfuse::autofused_rmsnorm", mutates_args=())
def autofused_rmsnorm(x: Tensor, weight: Tensor, eps: float, eps_t: Optional[Tensor], weight_offset: float,
                      group_name: str, max_tokens: int) -> Tensor:
    """``rmsnorm(allreduce(x)) * (weight + weight_offset)`` over the group ``group_name``."""
    eps = _eps(eps, eps_t)
    hidden = x.shape[-1]
    x2, weight = _flat(x, hidden), weight.contiguous()
    group, fusion = fusion_for(group_name, hidden, x.dtype, x.device, max_tokens)
    if x2.shape[0] > max_tokens:
        _over_capacity("rmsnorm", x2.shape[0], max_tokens)
        out, _ = _unfused(x2, None, weight, eps, weight_offset, None, group, x.dtype)
    else:
        out = fusion.rmsnorm(x2, weight, eps, weight_offset=weight_offset)
    return out.view(x.shape)


@autofused_rmsnorm.register_fake
def _(x, weight, eps, eps_t, weight_offset, group_name, max_tokens):
    return _like(x)


@torch.library.custom_op("arfuse::autofused_all_reduce", mutates_args=())
def autofused_all_reduce(x: Tensor, group_name: str, max_tokens: int) -> Tensor:
    """``allreduce(x)`` (sum) over the group ``group_name`` through arfuse's fastest path."""
    hidden = x.shape[-1]
    x2 = _flat(x, hidden)
    group, fusion = fusion_for(group_name, hidden, x.dtype, x.device, max_tokens)
    if x2.shape[0] > max_tokens:
        _over_capacity("all_reduce", x2.shape[0], max_tokens)
        out, _ = _unfused(x2, None, None, 1.0, 0.0, None, group, x.dtype)
    else:
        out = fusion.all_reduce(x2)
    return out.view(x.shape)


@autofused_all_reduce.register_fake
def _(x, group_name, max_tokens):
    return _like(x)
