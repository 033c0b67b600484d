"""The one place that knows FlashInfer's call shapes: it builds every create/fuse/destroy call from the probed
parameter lists (:mod:`arfuse.probe.flashinfer_api`), so any recorded generation - and newer ones that only add
parameters - is driven correctly.

Rules (why each matters):
- a value is passed only if the installed function accepts that name; leading required parameters go by position
  in the function's own declared order (0.2.8 has ``use_oneshot`` before ``trigger_completion_at_end``, 0.2.9+
  after ``pattern_code``); a function whose signature cannot be read gets keywords only;
- ``group`` is passed whenever accepted: without it FlashInfer >= 0.6.10 rendezvouses on WORLD and a subgroup's
  peers hang;
- ``trigger_completion_at_end=True``: an early completion signal from the one-shot Lamport kernel lets a following
  PDL kernel read data still in flight; ``launch_with_pdl=False``: arfuse cannot know that the kernel after it
  waits on ``griddepcontrol``, and PDL only pays off when it does;
- workspaces are created with ``backend="trtllm"`` only ("auto"/"mnnvl" may use NVLink multicast), and MoE
  finalize runs FlashInfer's ``trtllm`` implementation (``moe_finalize_backend``/``backend="trtllm"``);
- optional values a spec does not use (group size, MoE tensors) are left out rather than passed as None, so a
  release that validates them never sees them;
- legacy workspace returns are normalised: a flat pointer list (0.2.8's annotation), ``(ipc_handles,
  workspace_tensor)`` (0.2.11) and ``(..., metadata)`` (0.5.0+ with ``create_metadata``; passed back as
  ``metadata=``).
"""
from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from arfuse.core.counters import log_once
from arfuse.probe import flashinfer_api as fi_api
from arfuse.probe.flashinfer_api import FlashInferProbe, FunctionInfo

TRTLLM = "trtllm"
# FlashInfer's cap on one Lamport buffer (MAX_INT32 rounded down to 2 MiB); beyond it one-shot cannot run.
MAX_COMM_SIZE = 2147483647 & ~((1 << 21) - 1)
# FlashInfer's own token bound for one-shot, used where its heuristic cannot be asked (use_oneshot=None).
ONESHOT_MAX_TOKENS = 128
# World sizes FlashInfer's heuristic table knows; for others it raises KeyError, so arfuse decides.
HEURISTIC_WORLD_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class _Shape:
    positional: Tuple[str, ...]
    keywords: Tuple[str, ...]


@functools.lru_cache(maxsize=512)
def _shape(info: FunctionInfo, names: frozenset) -> _Shape:
    positional, keywords, by_position = [], [], True
    for name, kind, has_default in info.layout:
        if kind in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            continue
        supplied = name in names
        positional_kind = kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
        if positional_kind and by_position and (not has_default or (kind == "POSITIONAL_ONLY" and supplied)):
            if not supplied:
                raise TypeError(f"{info.name}: arfuse has no value for required parameter {name!r}")
            positional.append(name)
            continue
        by_position = False
        if kind == "POSITIONAL_ONLY" and (supplied or not has_default):
            raise TypeError(f"{info.name}: positional-only parameter {name!r} follows one arfuse skips")
        if not has_default and not supplied:
            raise TypeError(f"{info.name}: arfuse has no value for required parameter {name!r}")
        if supplied:
            keywords.append(name)
    if info.var_keyword:
        keywords.extend(sorted(n for n in names if n not in info.params))
    return _Shape(tuple(positional), tuple(keywords))


_SHAPES: Dict[tuple, Tuple[FunctionInfo, _Shape]] = {}  # (id(info), value names in order) -> (info, shape)


def build_call(info: FunctionInfo, values: Mapping[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` calling ``info``'s function with ``values``: names it does not accept are dropped,
    leading required parameters go by position in its declared order, the rest by keyword. Raises TypeError
    naming a required parameter arfuse has no value for."""
    key = (id(info), tuple(values))  # per call only the names' tuple is hashed (a FunctionInfo hash walks it all)
    found = _SHAPES.get(key)
    if found is not None and found[0] is info:
        shape = found[1]
    else:
        shape = _shape(info, frozenset(values))
        if len(_SHAPES) >= 512:
            _SHAPES.clear()
        _SHAPES[key] = (info, shape)
    return tuple([values[n] for n in shape.positional]), {n: values[n] for n in shape.keywords}


def resolve(name: str) -> Callable:
    """The installed ``flashinfer.comm`` function ``name``; raises LookupError (not collective)."""
    comm = importlib.import_module("flashinfer.comm")
    fn, err = fi_api._lookup(comm, name)
    if fn is None:
        raise LookupError(f"flashinfer.comm.{name} not found" + (f": {err}" if err else ""))
    return fn


@dataclass
class Handle:
    """One created FlashInfer workspace and what calling into it needs."""

    path: str
    rank: int
    world: int
    max_tokens: int
    hidden: int
    dtype: torch.dtype
    group: Any
    fusion: FunctionInfo
    fusion_fn: Callable
    flags: Mapping[str, bool]
    workspace: Any = None  # unified: FlashInfer's workspace object
    ipc_handles: Any = None  # legacy: what the destroy function takes back
    workspace_tensor: Optional[torch.Tensor] = None
    metadata: Optional[dict] = None
    destroy_info: Optional[FunctionInfo] = None
    destroyed: bool = field(default=False)
    moe: Optional[FunctionInfo] = None  # legacy: the MoE finalize function (the unified API uses ``fusion``)
    moe_fn: Optional[Callable] = None

    @property
    def elements(self) -> int:
        return self.max_tokens * self.hidden


def create_values(path: str, *, rank: int, world: int, max_tokens: int, hidden: int, dtype: torch.dtype,
                  group, flags: Mapping[str, bool]) -> Dict[str, Any]:
    """Every value arfuse may pass to ``path``'s workspace factory (``build_call`` drops what it does not take).

    FlashInfer sizes its two-shot buffer at 2 bytes per element whatever the dtype, so fp32 asks for twice the
    tokens."""
    tokens = max_tokens * (2 if dtype == torch.float32 else 1)
    if path == fi_api.UNIFIED:
        return {"backend": TRTLLM, "world_size": world, "rank": rank, "max_token_num": tokens,
                "hidden_dim": hidden, "dtype": dtype, "group": group}
    values = {"tp_rank": rank, "tp_size": world, "max_token_num": tokens, "hidden_dim": hidden,
              "use_fp32_lamport": dtype == torch.float32, "group": group}
    if flags.get("create_metadata"):
        values["create_metadata"] = True
    return values


def normalize_legacy(result, device: torch.device) -> Tuple[Any, torch.Tensor, Optional[dict]]:
    """``(ipc_handles, workspace_tensor, metadata)`` from any legacy factory's return value."""
    if isinstance(result, (list, tuple)) and result and all(type(p) is int for p in result):
        return list(result), torch.tensor(list(result), dtype=torch.int64, device=device), None
    if isinstance(result, (list, tuple)) and 2 <= len(result) <= 4 and isinstance(result[1], torch.Tensor):
        metadata = result[-1] if len(result) >= 3 and isinstance(result[-1], dict) else None
        return result[0], result[1], metadata
    raise TypeError(f"{fi_api.LEGACY_CREATE} returned an unknown workspace shape: {type(result).__name__} "
                    f"of length {len(result) if isinstance(result, (list, tuple)) else 'n/a'}")


def create(probe: FlashInferProbe, path: str, *, rank: int, world: int, max_tokens: int, hidden: int,
           dtype: torch.dtype, group, device: torch.device) -> Handle:
    """Create a FlashInfer workspace through ``path``. Collective over ``group`` (FlashInfer rendezvouses)."""
    create_name, fusion_name = fi_api.FUNCTIONS[path]
    flags = probe.flags(path)
    values = create_values(path, rank=rank, world=world, max_tokens=max_tokens, hidden=hidden, dtype=dtype,
                           group=group, flags=flags)
    args, kwargs = build_call(probe.functions[create_name], values)
    result = resolve(create_name)(*args, **kwargs)
    handle = Handle(path, rank, world, max_tokens, hidden, dtype, group, probe.functions[fusion_name],
                    resolve(fusion_name), flags, destroy_info=probe.functions.get(fi_api.LEGACY_DESTROY))
    if path == fi_api.UNIFIED:
        handle.workspace = result
        backend = getattr(result, "backend", TRTLLM)
        if backend != TRTLLM:
            destroy(handle)
            raise RuntimeError(f"{create_name} returned a {backend!r} workspace, arfuse asked for {TRTLLM!r}")
    else:
        handle.ipc_handles, handle.workspace_tensor, handle.metadata = normalize_legacy(result, device)
        handle.moe = probe.functions.get(fi_api.LEGACY_MOE)
        handle.moe_fn = resolve(fi_api.LEGACY_MOE) if handle.moe is not None else None
    return handle


def destroy(handle: Handle) -> None:
    """Free a workspace (idempotent). FlashInfer < 0.6 frees IPC buffers with a barrier, so this may be
    collective there; it never raises (it also runs at interpreter exit)."""
    if handle.destroyed:
        return
    handle.destroyed = True
    try:
        if handle.path == fi_api.UNIFIED:
            release = getattr(handle.workspace, "destroy", None)
            if callable(release):
                release()
        elif handle.destroy_info is not None:
            args, kwargs = build_call(handle.destroy_info, {"workspace": handle.ipc_handles, "group": handle.group})
            resolve(fi_api.LEGACY_DESTROY)(*args, **kwargs)
    except Exception as e:  # boundary: teardown must not raise (the process group may already be gone)
        log_once(f"flashinfer-destroy:{type(e).__name__}", f"arfuse: destroying a FlashInfer workspace "
                 f"failed ({type(e).__name__}: {e}); its memory is released at exit", logging.WARNING)
    handle.workspace = handle.ipc_handles = handle.workspace_tensor = handle.metadata = None


def use_oneshot(variant: str, num_tokens: int, handle: Handle) -> Optional[bool]:
    """FlashInfer's ``use_oneshot`` for a variant. Two-shot needs more tokens than ranks, so smaller calls run
    one-shot (the same result); ``auto`` leaves the choice to FlashInfer where its heuristic can be asked."""
    if variant == "oneshot":
        return True
    if variant == "twoshot":
        return num_tokens <= handle.world
    if handle.flags.get("use_oneshot_none") and handle.world in HEURISTIC_WORLD_SIZES:
        return None
    return num_tokens <= ONESHOT_MAX_TOKENS


def fusion_call(handle: Handle, *, pattern_code: int, oneshot: Optional[bool], x: torch.Tensor,
                allreduce_out: Optional[torch.Tensor], residual_in: Optional[torch.Tensor],
                residual_out: Optional[torch.Tensor], norm_out: Optional[torch.Tensor],
                quant_out: Optional[torch.Tensor], gamma: Optional[torch.Tensor], eps: float,
                scale: Optional[torch.Tensor], scale_out: Optional[torch.Tensor] = None,
                group_size: Optional[int] = None, weight_bias: float = 0.0) -> Tuple[Callable, tuple, Dict[str, Any]]:
    """``(fn, args, kwargs)`` for one fused call on ``handle``'s generation. Graph-safe (no allocation).

    ``scale_out``: dynamic scales (per-token fp32 (tokens, 1), or packed UE8M0 int32 in FlashInfer's exact
    strides); ``group_size``: ``block_quant_group_size``, passed only when given; ``weight_bias``: the norm's
    weight offset."""
    fp32_acc = x.dtype != torch.float32  # FlashInfer's fp32 kernels refuse fp32_acc
    common = {"launch_with_pdl": False, "trigger_completion_at_end": True, "fp32_acc": fp32_acc,
              "use_oneshot": oneshot, "residual_in": residual_in, "residual_out": residual_out,
              "norm_out": norm_out, "quant_out": quant_out, "scale_out": scale_out, "rms_gamma": gamma,
              "rms_eps": eps, "scale_factor": scale, "layout_code": None, "weight_bias": float(weight_bias)}
    if group_size is not None:
        common["block_quant_group_size"] = int(group_size)
    if handle.path == fi_api.UNIFIED:
        values = dict(common, input=x, workspace=handle.workspace, pattern=pattern_code, output=allreduce_out)
    else:
        values = dict(common, allreduce_in=x, world_size=handle.world, world_rank=handle.rank,
                      token_num=x.shape[0], hidden_dim=x.shape[1], workspace_ptrs=handle.workspace_tensor,
                      pattern_code=pattern_code, allreduce_out=allreduce_out)
        if handle.metadata is not None and x.shape[1] == handle.hidden:
            values["metadata"] = handle.metadata
    args, kwargs = build_call(handle.fusion, values)
    return handle.fusion_fn, args, kwargs


def moe_finalize_call(handle: Handle, *, pattern_code: Optional[int], expert_out: torch.Tensor,
                      permuted_idx: torch.Tensor, expert_scales: torch.Tensor, shared: Optional[torch.Tensor],
                      residual_in: torch.Tensor, residual_out: torch.Tensor, norm_out: torch.Tensor,
                      gamma: torch.Tensor, eps: float, weight_bias: float = 0.0) -> Tuple[Callable, tuple, Dict]:
    """``(fn, args, kwargs)`` for MoE finalize + allreduce + residual + RMSNorm: ``allreduce_fusion`` with
    ``pattern_code`` (kMoEFinalizeARResidualRMSNorm) on the unified API, ``trtllm_moe_finalize_allreduce_fusion``
    on the legacy one. ``permuted_idx`` (tokens, top_k) int32 row-major is FlashInfer's
    ``expanded_idx_to_permuted_idx`` as it is (its entry ``t * top_k + k``); ``expert_scales`` must already have the
    input dtype (FlashInfer reads them as such). One-shot only (FlashInfer takes no ``use_oneshot`` for it)."""
    common = {"residual_in": residual_in, "residual_out": residual_out, "norm_out": norm_out, "rms_gamma": gamma,
              "expanded_idx_to_permuted_idx": permuted_idx, "expert_scale_factor": expert_scales,
              "shared_expert_output": shared, "weight_bias": float(weight_bias), "launch_with_pdl": False}
    if handle.path == fi_api.UNIFIED:
        values = dict(common, input=expert_out, workspace=handle.workspace, pattern=pattern_code, rms_eps=eps,
                      trigger_completion_at_end=True, moe_finalize_backend=TRTLLM)
        args, kwargs = build_call(handle.fusion, values)
        return handle.fusion_fn, args, kwargs
    if handle.moe is None:
        raise LookupError(f"flashinfer.comm.{fi_api.LEGACY_MOE} not found")
    values = dict(common, allreduce_in=expert_out, norm_weight=gamma, quant_out=None, scale_out=None,
                  workspace_ptrs=handle.workspace_tensor, world_rank=handle.rank, world_size=handle.world, eps=eps,
                  routed_scaling_factor=None, backend=TRTLLM)
    args, kwargs = build_call(handle.moe, values)
    return handle.moe_fn, args, kwargs
