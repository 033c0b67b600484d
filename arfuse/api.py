"""The public fusion object: allreduce + residual add + RMSNorm (and plain allreduce, RMSNorm, FP8 epilogue)."""
from __future__ import annotations

import logging
import math
import weakref
from typing import Dict, Optional, Tuple, Union

import torch

from arfuse.backends import base
from arfuse.core import outputs as out_specs
from arfuse.core import settings, validate as v
from arfuse.core.counters import StatsView, logger, resolve_strict
from arfuse.core.errors import FallbackError
from arfuse.core.fast import FastChecks, finite_float
from arfuse.core.quant import QUANT_TYPES, FP8PerToken, FP8PerTokenGroup, FP8Static
from arfuse.core.spec import FusionSpec, Prologue, Quant
from arfuse.core.types import Capacity, FusedCall, FusedOutput, GroupCaps, Pattern, Plan
from arfuse.probe import vote
from arfuse.runtime.custom_op import register_executor, run_call
from arfuse.runtime.executor import Executor
from arfuse.select import policy

Tensor = torch.Tensor
# The eager fast path (arfuse.core.fast): on unless ARFUSE_FAST_PATH=0 (read when a fusion object is built).
FAST_PATH_ENV = "ARFUSE_FAST_PATH"


def _default_device(group) -> torch.device:
    if vote.is_distributed(group) and "nccl" in str(torch.distributed.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _normalize_device(device) -> torch.device:
    """``device`` as a torch.device with its index; ValueError/TypeError naming ``device`` if it is not one this
    process can use (checked before any collective)."""
    op = "AllReduceFusion"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{op}: device must be a str, int or torch.device, got {type(device).__name__}")
    try:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{op}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{op}: device must be a cpu or cuda device, got {device}")
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise ValueError(f"{op}: device {device} cannot be used: {why}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{op}: device {device} does not exist: {count} CUDA device(s) visible")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _check_backend_name(requested) -> str:
    if not isinstance(requested, str):
        raise TypeError(f"AllReduceFusion: backend must be a str, got {type(requested).__name__}")
    name, variant = policy.parse_request(requested)
    if name == policy.AUTO:
        return requested
    backend = base.get(name)  # ValueError listing the registered names
    if variant is not None and variant not in backend.variants:
        raise ValueError(f"AllReduceFusion: backend {name!r} has no variant {variant!r} "
                         f"(has {', '.join(backend.variants)})")
    return requested


def _check_timeout(timeout_s) -> float:
    if timeout_s is None:
        timeout_s = settings.number("ARFUSE_TIMEOUT_S")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"AllReduceFusion: timeout_s must be a number, got {type(timeout_s).__name__}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"AllReduceFusion: timeout_s must be finite and > 0, got {timeout_s}")
    return float(timeout_s)


_SPECS: Dict[tuple, FusionSpec] = {}


def spec_of(**fields) -> FusionSpec:
    """The (interned) spec with these fields, the rest at their defaults."""
    key = tuple(sorted(fields.items()))
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = FusionSpec(**fields)
    return spec


_RR, _RR_OFFSET = spec_of(weight_offset=False), spec_of(weight_offset=True)
_R8, _R8_OFFSET = (spec_of(weight_offset=False, quant=Quant.FP8_STATIC),
                   spec_of(weight_offset=True, quant=Quant.FP8_STATIC))
_RN, _RN_OFFSET = spec_of(residual=False, weight_offset=False), spec_of(residual=False, weight_offset=True)
_AR = spec_of(residual=False, norm=False)
_QUANT_SPECS: Dict[tuple, FusionSpec] = {}


def _fast_quant_spec(quant, offset: bool, also_norm, moe: bool, shared: bool) -> Optional[FusionSpec]:
    """The spec the checked path derives for a quantizing call (the same interned object), or None when
    ``quant`` or ``also_norm`` is not one the fast path recognises."""
    kind = type(quant)
    if kind is FP8PerTokenGroup:
        q = (quant.group_size, quant.packed_ue8m0)
    elif kind is FP8PerToken or kind is FP8Static:
        q = kind
    elif quant is None and moe:
        q = None
    else:
        return None
    if also_norm is not False and (also_norm is not True or quant is None):
        return None  # the checked path says what is wrong
    key = (q, offset, also_norm, moe, shared)
    spec = _QUANT_SPECS.get(key)
    if spec is None:
        fields = quant.spec_fields() if quant is not None else {}
        if moe:
            fields.update(prologue=Prologue.MOE_FINALIZE, shared_expert=shared)
        spec = _QUANT_SPECS[key] = spec_of(weight_offset=offset, also_norm=also_norm, **fields)
    return spec


def _flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def _quant_fields(op: str, quant) -> Tuple[dict, Optional[Union[float, Tensor]]]:
    """The spec fields of a ``quant=`` argument, and its static scale (None for dynamic ones)."""
    if not isinstance(quant, QUANT_TYPES):
        raise TypeError(f"{op}: quant must be arfuse.FP8Static(scale), arfuse.FP8PerToken() or "
                        f"arfuse.FP8PerTokenGroup(...), got {type(quant).__name__}")
    return quant.spec_fields(), (quant.scale if isinstance(quant, FP8Static) else None)


def _quant_output(call: FusedCall) -> FusedOutput:
    scale = call.scale_out if call.scale_out is not None else call.scale
    return FusedOutput(call.out, scale, call.residual_out, call.norm_out)


def _check_requested_can_run(executor: Executor, requested: str, strict: Optional[bool]) -> None:
    """In strict mode, a named backend none of whose plans can run (every pattern and token count would fall
    back) is refused at construction, not at the first call. The plans are computed alike on every rank from the
    agreed capabilities, so every rank raises together."""
    if requested == policy.AUTO or not resolve_strict(strict):
        return
    reason = executor.never_runs()
    if reason is not None:
        raise FallbackError(policy.parse_request(requested)[0], reason)


def _close_at_exit(executor: Executor) -> None:
    try:
        executor.close()
    except Exception as e:  # at interpreter exit CUDA or the process group may already be gone
        logger.log(logging.DEBUG, "arfuse: close at exit: %s", e)


class AllReduceFusion:
    """Fused allreduce + residual add + RMSNorm for the ranks of ``group``, sized for a capacity.

    ``AllReduceFusion(group, max_tokens=..., hidden_size=..., dtype=..., device=..., backend="auto",
    strict=None)``. Construction is **collective** (every rank of ``group`` must construct it, with the same
    arguments): it probes the group, prepares the workspaces of the backends it may use and agrees on them.
    The ops are collective too, graph-capturable when the chosen backend is (all GPU backends are), and compile
    under ``torch.compile(fullgraph=True)``. Before capturing a CUDA graph, run each op at each token count the
    graph will use once eagerly (the usual warm-up): Triton compiles a kernel on its first launch per pattern,
    dtype and, for the smallest calls, push split, and compiling is not allowed while a stream is capturing.

    ``backend``: ``"auto"`` (fastest capable path per size), a registered name (``"torch_ref"``, ``"nccl"``,
    ``"triton_symm"``, ``"flashinfer"``) or ``"name/variant"``. A named path that cannot run a size falls back
    to ``torch_ref`` (logged once, counted) or, in strict mode, raises :class:`FallbackError` - at construction
    already (on every rank) when it cannot run any pattern at any size here.
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a CUDA index or a torch.device (default: the current CUDA
    device under an NCCL group, else cpu); one this process cannot use is a ValueError naming ``device``.
    ``strict``: None follows :class:`arfuse.strict`. ``table_path``: a tuning table (default: ``arfuse tune``'s).
    ``timeout_s``: how long a kernel waits for a peer before recording :class:`PeerTimeoutError` (default
    ``ARFUSE_TIMEOUT_S`` or 10 s).

    >>> fusion = AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu")
    >>> x, res, w = torch.randn(4, 16), torch.randn(4, 16), torch.ones(16)
    >>> norm, res_out = fusion.residual_rmsnorm(x, res, w, eps=1e-6)   # world size 1: no collective
    >>> torch.allclose(res_out, x + res)
    True
    >>> fusion.stats()["calls"]
    {'torch_ref': 1}
    >>> fusion.close()
    """

    def __init__(self, group=None, *, max_tokens: int, hidden_size: int, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device, None] = None, backend: str = "auto",
                 strict: Optional[bool] = None, table_path=None, timeout_s: Optional[float] = None):
        op = "AllReduceFusion"
        for name, value in (("max_tokens", max_tokens), ("hidden_size", hidden_size)):
            v.check_int_arg(op, name, value)
        if dtype not in v.SUPPORTED_DTYPES:
            raise TypeError(f"{op}: dtype must be one of float32/bfloat16/float16, got {dtype}")
        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"{op}: strict must be a bool or None, got {type(strict).__name__}")
        requested = _check_backend_name(backend)
        timeout_s = _check_timeout(timeout_s)
        device = _normalize_device(device) if device is not None else _default_device(group)
        self.capacity = Capacity(max_tokens, hidden_size, dtype, device, timeout_s)
        self._executor = Executor(group, self.capacity, requested, strict, table_path)
        try:
            _check_requested_can_run(self._executor, requested, strict)
        except BaseException:
            self._executor.close()
            raise
        self._handle = register_executor(self._executor)
        self._finalizer = weakref.finalize(self, _close_at_exit, self._executor)
        fast = settings.switch(FAST_PATH_ENV)
        self._fast: Optional[FastChecks] = FastChecks(self.capacity) if fast else None

    # -- the ops ---------------------------------------------------------------------------------------------
    def residual_rmsnorm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                         weight_offset: float = 0.0, norm_out: Optional[Tensor] = None,
                         residual_out: Optional[Tensor] = None, inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """``residual_out = allreduce(x) + residual``; ``norm_out = rmsnorm(residual_out) * (weight +
        weight_offset)``.

        Math in fp32, outputs in the input dtype. ``weight_offset``: 1.0 for Gemma-style norms. ``inplace=True``
        writes ``residual_out`` into ``residual`` (what engines do). Optional ``norm_out``/``residual_out`` are
        written instead of new tensors. Returns ``(norm_out, residual_out)``. Collective; graph-capturable.
        """
        fast, executor = self._fast, self._executor
        if fast is not None and not executor.closed and finite_float(weight_offset):
            spec = _RR_OFFSET if weight_offset else _RR
            call = fast.call(spec, x, residual, weight, eps, weight_offset, None, inplace, norm_out, residual_out,
                             None, None)
            if call is not None:
                executor.run(spec, call)
                return call.out, call.residual_out
        op = "residual_rmsnorm"
        offset = v.check_weight_offset(op, weight_offset)
        call = self._fused(op, spec_of(weight_offset=offset != 0.0), x, residual=residual, weight=weight, eps=eps,
                           weight_offset=offset, inplace=inplace,
                           outputs={"out": norm_out, "residual_out": residual_out},
                           labels={"out": "norm_out"})
        return call.out, call.residual_out

    def residual_rmsnorm_fp8(self, x: Tensor, residual: Tensor, weight: Tensor, scale: Union[float, Tensor],
                             eps: float = 1e-6, *, weight_offset: float = 0.0, quant_out: Optional[Tensor] = None,
                             residual_out: Optional[Tensor] = None, inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """As :meth:`residual_rmsnorm`, with the normed output quantized to FP8 e4m3:
        ``quant_out = clamp(norm / scale, -448, 448)`` (static per-tensor ``scale``: a float or a 1-element
        float32 tensor). Returns ``(quant_out, residual_out)``. Collective; graph-capturable. The general form
        is :meth:`residual_rmsnorm_quant` with :class:`arfuse.FP8Static`.
        """
        fast, executor = self._fast, self._executor
        if fast is not None and not executor.closed and finite_float(weight_offset):
            spec = _R8_OFFSET if weight_offset else _R8
            call = fast.call(spec, x, residual, weight, eps, weight_offset, scale, inplace, quant_out, residual_out,
                             None, None)
            if call is not None:
                executor.run(spec, call)
                return call.out, call.residual_out
        op = "residual_rmsnorm_fp8"
        offset = v.check_weight_offset(op, weight_offset)
        call = self._fused(op, spec_of(weight_offset=offset != 0.0, quant=Quant.FP8_STATIC), x, residual=residual,
                           weight=weight, eps=eps, weight_offset=offset, scale=scale, inplace=inplace,
                           outputs={"out": quant_out, "residual_out": residual_out}, labels={"out": "quant_out"})
        return call.out, call.residual_out

    def residual_rmsnorm_quant(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *, quant,
                               weight_offset: float = 0.0, also_norm: bool = False, inplace: bool = False,
                               quant_out: Optional[Tensor] = None, scale_out: Optional[Tensor] = None,
                               residual_out: Optional[Tensor] = None,
                               norm_out: Optional[Tensor] = None) -> FusedOutput:
        """``allreduce(x) + residual -> RMSNorm -> FP8``, the quantization chosen by ``quant``:
        :class:`arfuse.FP8Static` (the caller's per-tensor scale), :class:`arfuse.FP8PerToken` (one float32 scale
        per token) or :class:`arfuse.FP8PerTokenGroup` (one scale per token and group of columns, float32 or
        DeepGEMM's packed UE8M0). ``also_norm=True`` also writes the norm in the input dtype.

        Returns :class:`arfuse.FusedOutput` ``(quant, scale, residual, norm)``: ``scale`` is the dynamic scales
        (or the static scale as a tensor), ``norm`` None unless ``also_norm``. Caller-provided outputs
        (``quant_out``, ``scale_out``, ``residual_out``, ``norm_out``) are written instead of new tensors.
        Collective; graph-capturable.
        """
        fast, executor = self._fast, self._executor
        if fast is not None and not executor.closed and finite_float(weight_offset):
            spec = _fast_quant_spec(quant, weight_offset != 0.0, also_norm, False, False)
            if spec is not None:
                call = fast.call(spec, x, residual, weight, eps, weight_offset,
                                 quant.scale if type(quant) is FP8Static else None, inplace, quant_out, residual_out,
                                 norm_out, scale_out)
                if call is not None:
                    executor.run(spec, call)
                    return _quant_output(call)
        op = "residual_rmsnorm_quant"
        offset = v.check_weight_offset(op, weight_offset)
        fields, scale = _quant_fields(op, quant)
        spec = spec_of(weight_offset=offset != 0.0, also_norm=_flag(op, "also_norm", also_norm), **fields)
        call = self._fused(op, spec, x, residual=residual, weight=weight, eps=eps, weight_offset=offset,
                           scale=scale, inplace=inplace, outputs={"out": quant_out, "scale_out": scale_out,
                                                                  "residual_out": residual_out, "norm_out": norm_out},
                           labels={"out": "quant_out"})
        return _quant_output(call)

    def moe_finalize_residual_rmsnorm(self, expert_out: Tensor, permuted_idx: Tensor, expert_scales: Tensor,
                                      residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                                      shared_expert_out: Optional[Tensor] = None, weight_offset: float = 0.0,
                                      quant=None, also_norm: bool = False, inplace: bool = False,
                                      quant_out: Optional[Tensor] = None, scale_out: Optional[Tensor] = None,
                                      residual_out: Optional[Tensor] = None,
                                      norm_out: Optional[Tensor] = None) -> FusedOutput:
        """MoE finalize fused with allreduce + residual + RMSNorm (+ a quantization):
        ``x[t] = sum_k expert_scales[t, k] * expert_out[permuted_idx[t, k]] (+ shared_expert_out[t])`` on this
        rank (fp32, rounded to the input dtype), then as :meth:`residual_rmsnorm` (``quant=None``) or
        :meth:`residual_rmsnorm_quant`.

        ``expert_out`` (P, hidden): the permuted expert outputs; ``permuted_idx`` int32 (tokens, top_k): where
        token ``t``'s ``k``-th expert row is; ``expert_scales`` (tokens, top_k), float32 or the input dtype. An index
        outside ``[0, P)`` raises ValueError before any collective for CPU tensors; on GPU the kernels read no row
        for it (it adds nothing) and record it without a host sync; :meth:`check_health` raises ValueError (the
        next call does not: only the ranks that saw the index would raise, leaving the others in the collective).
        Returns :class:`arfuse.FusedOutput`. Collective; graph-capturable.
        """
        fast, executor = self._fast, self._executor
        if fast is not None and not executor.closed and finite_float(weight_offset):
            spec = _fast_quant_spec(quant, weight_offset != 0.0, also_norm, True, shared_expert_out is not None)
            if spec is not None:
                call = fast.call(spec, expert_out, residual, weight, eps, weight_offset,
                                 quant.scale if type(quant) is FP8Static else None, inplace,
                                 quant_out if quant is not None else norm_out, residual_out,
                                 norm_out if quant is not None else None, scale_out, permuted_idx, expert_scales,
                                 shared_expert_out)
                if call is not None:
                    executor.run(spec, call)
                    return _quant_output(call) if quant is not None else FusedOutput(None, None, call.residual_out,
                                                                                     call.out)
        op = "moe_finalize_residual_rmsnorm"
        offset = v.check_weight_offset(op, weight_offset)
        fields, scale = _quant_fields(op, quant) if quant is not None else ({}, None)
        if _flag(op, "also_norm", also_norm) and quant is None:
            raise ValueError(f"{op}: also_norm=True needs a quant= (without one the norm is the output)")
        spec = spec_of(weight_offset=offset != 0.0, also_norm=_flag(op, "also_norm", also_norm),
                       prologue=Prologue.MOE_FINALIZE, shared_expert=shared_expert_out is not None, **fields)
        call = self._fused(op, spec, expert_out, residual=residual, weight=weight, eps=eps, weight_offset=offset,
                           scale=scale, inplace=inplace, moe=(permuted_idx, expert_scales, shared_expert_out),
                           outputs={"out": quant_out if quant is not None else norm_out, "scale_out": scale_out,
                                    "residual_out": residual_out,
                                    "norm_out": norm_out if quant is not None else None},
                           labels={"out": "quant_out" if quant is not None else "norm_out"})
        return _quant_output(call) if quant is not None else FusedOutput(None, None, call.residual_out, call.out)

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float = 1e-6, *, weight_offset: float = 0.0,
                out: Optional[Tensor] = None) -> Tensor:
        """``rmsnorm(allreduce(x)) * (weight + weight_offset)`` (no residual). Collective; graph-capturable."""
        fast, executor = self._fast, self._executor
        if fast is not None and not executor.closed and finite_float(weight_offset):
            spec = _RN_OFFSET if weight_offset else _RN
            call = fast.call(spec, x, None, weight, eps, weight_offset, None, False, out, None, None, None)
            if call is not None:
                executor.run(spec, call)
                return call.out
        op = "rmsnorm"
        offset = v.check_weight_offset(op, weight_offset)
        return self._fused(op, spec_of(residual=False, weight_offset=offset != 0.0), x, weight=weight, eps=eps,
                           weight_offset=offset, outputs={"out": out}).out

    def all_reduce(self, x: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
        """Plain sum-allreduce of ``x`` into a new tensor (or ``out``). Collective; graph-capturable."""
        fast, executor = self._fast, self._executor
        if fast is not None and not executor.closed:
            call = fast.call(_AR, x, None, None, 1.0, 0.0, None, False, out, None, None, None)
            if call is not None:
                executor.run(_AR, call)
                return call.out
        return self._fused("all_reduce", spec_of(residual=False, norm=False), x, outputs={"out": out}).out

    def _fused(self, op: str, spec: FusionSpec, x, *, residual=None, weight=None, eps=1.0, weight_offset=0.0,
               scale=None, inplace: bool = False, moe=None, outputs: Dict[str, Optional[Tensor]],
               labels: Optional[Dict[str, str]] = None) -> FusedCall:
        """Check one call's arguments (before any collective), prepare its outputs and run it."""
        self._check_open(op)
        cap = self.capacity
        if moe is not None:
            tokens = v.check_moe(op, x, moe[0], moe[1], moe[2], cap)
        else:
            tokens = v.check_input(op, x, cap)
        shape = (tokens, cap.hidden_size)
        if spec.residual:
            v.check_tensor(op, "residual", residual, dtype=cap.dtype, device=cap.device, shape=shape)
        if spec.norm:
            v.check_weight(op, weight, cap)
            eps = v.check_eps(op, eps)
        if spec.group_size:
            v.check_group_size(op, spec.group_size, cap.hidden_size)
        scale_t = v.check_scale(op, scale, cap.device) if spec.quant is Quant.FP8_STATIC else None
        inplace = _flag(op, "inplace", inplace)
        if inplace and outputs.get("residual_out") is not None:
            raise ValueError(f"{op}: pass either inplace=True or residual_out, not both")
        labels = labels or {}
        given = {k: t for k, t in outputs.items() if t is not None}
        if inplace:
            given["residual_out"] = residual
        made = out_specs.prepare(op, spec, tokens, cap.hidden_size, cap.dtype, cap.device, given, labels)
        if given:  # only caller-provided memory can overlap anything, so fresh outputs skip the (costly) check
            inputs = {"x" if moe is None else "expert_out": x, "residual": residual, "weight": weight}
            if moe is not None:
                inputs.update(permuted_idx=moe[0], expert_scales=moe[1], shared_expert_out=moe[2])
            self._check_disjoint(op, {labels.get(k, k): made[k] for k in given}, inputs,
                                 allowed=("residual_out", "residual") if inplace else None)
        idx, escales, shared = moe if moe is not None else (None, None, None)
        call = FusedCall(x, made["out"], residual=residual, weight=weight, eps=eps, weight_offset=weight_offset,
                         scale=scale_t, expert_idx=idx, expert_scales=escales, shared=shared,
                         residual_out=made.get("residual_out"), norm_out=made.get("norm_out"),
                         scale_out=made.get("scale_out"))
        run_call(self._executor, self._handle, spec, call)
        return call

    @staticmethod
    def _check_disjoint(op, outputs, inputs, allowed=None) -> None:
        if not torch.compiler.is_compiling():  # data pointers do not exist while tracing
            v.check_outputs_disjoint(op, outputs, inputs, allowed)

    def _check_open(self, op: str) -> None:
        if self._executor.closed:
            raise ValueError(f"{op}: this AllReduceFusion is closed")

    # -- introspection and lifecycle -------------------------------------------------------------------------
    def stats(self) -> StatsView:
        """Counters: ``{"calls": {path: n}, "fallbacks": {reason: n}, "errors": {reason: n}}`` (prints as a
        table). Under CUDA graphs, captures are counted, not replays."""
        return self._executor.counters.snapshot()

    def reset_stats(self) -> None:
        self._executor.counters.reset()

    def plan(self, pattern: Union[Pattern, str, FusionSpec], num_tokens: int) -> Plan:
        """The plan a call of ``num_tokens`` tokens would run (``pattern``: a Pattern, its name, or a
        :class:`~arfuse.core.spec.FusionSpec`)."""
        spec = _spec_arg("plan", pattern)
        _check_tokens("plan", num_tokens, self.capacity.max_tokens)
        return self._executor.plan(spec, num_tokens)

    @property
    def caps(self) -> GroupCaps:
        """The group capabilities all ranks agreed on."""
        return self._executor.caps

    @property
    def backends(self) -> Tuple[str, ...]:
        """Names of the backends with a prepared workspace."""
        return tuple(self._executor.workspaces)

    @property
    def disabled(self) -> Dict[str, str]:
        """Backends dropped at construction or after an error, with the reason."""
        return dict(self._executor.disabled)

    def input_buffer(self, num_tokens: int, pattern: Union[Pattern, str, FusionSpec] = Pattern.RESIDUAL_RMSNORM
                     ) -> Optional[Tensor]:
        """A (num_tokens, hidden) tensor in the chosen backend's own input memory, or None.

        Writing the input there (e.g. as a GEMM's ``out=``) and passing it as ``x`` skips the copy-in.
        The contents are valid until the next call that uses this backend.
        """
        self._check_open("input_buffer")
        _check_tokens("input_buffer", num_tokens, self.capacity.max_tokens)
        spec = _spec_arg("input_buffer", pattern)
        if spec.moe:
            return None  # the MoE prologue's input is the expert rows, not a (tokens, hidden) tensor
        return self._executor.input_buffer(spec, num_tokens)

    def check_health(self) -> None:
        """Raise the error a previous launch recorded asynchronously: :class:`PeerTimeoutError`, or ValueError for a
        MoE index out of range (records stay set). Waits for the device's queued work first."""
        if self.capacity.device.type == "cuda":
            torch.cuda.synchronize(self.capacity.device)
        self._executor.raise_if_failed()

    @property
    def closed(self) -> bool:
        return self._executor.closed

    def close(self) -> None:
        """Free every workspace. Idempotent; also runs at interpreter exit. Not collective."""
        self._finalizer()

    def __enter__(self) -> "AllReduceFusion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.capacity
        state = "closed" if self.closed else f"backends={list(self.backends)}"
        return (f"AllReduceFusion(world_size={self.caps.world_size}, max_tokens={c.max_tokens}, "
                f"hidden_size={c.hidden_size}, dtype={v.dtype_name(c.dtype)}, device={c.device}, {state})")


def _check_tokens(op: str, num_tokens, max_tokens: int) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"{op}: num_tokens must be an int, got {type(num_tokens).__name__}")
    if not 1 <= num_tokens <= max_tokens:
        raise ValueError(f"{op}: num_tokens must be in 1..{max_tokens}, got {num_tokens}")


def _spec_arg(op: str, pattern) -> FusionSpec:
    if isinstance(pattern, FusionSpec):
        return pattern
    if isinstance(pattern, str):
        try:
            return Pattern[pattern.upper()].spec
        except KeyError:
            raise ValueError(f"{op}: pattern must be one of {', '.join(p.name.lower() for p in Pattern)} or a "
                             f"FusionSpec, got {pattern!r}") from None
    return Pattern(pattern).spec


def free_idle_workspaces() -> int:
    """Destroy the workspaces backends keep for reuse after their last fusion object closed; returns how many.

    FlashInfer's workspace is kept for the next fusion object of the same group and hidden size, because
    recreating it leaks: FlashInfer 0.7.2's destroy drops its Python references but the device memory stayed
    mapped (40 MiB per cycle, measured). Destroying releases what the installed FlashInfer releases (all of it
    for releases whose destroy frees). Call it on every rank of a group at once: before FlashInfer 0.6 destroy
    has a barrier."""
    return sum(b.free_idle() for b in base.registered())
