"""The public fusion object: allreduce + residual add + RMSNorm (and plain allreduce, RMSNorm, FP8 epilogue)."""
from __future__ import annotations

import logging
import weakref
from typing import Dict, Optional, Tuple, Union

import torch

from arfuse.backends import base
from arfuse.core import op_specs as opspecs
from arfuse.core import settings, validate as v
from arfuse.core.counters import StatsView, logger
from arfuse.core.op_specs import spec_for
from arfuse.core.prepare import Preparation
from arfuse.core.spec import ALLREDUCE as _ALL_REDUCE, FusionSpec
from arfuse.core.types import Capacity, FusedCall, FusedOutput, GroupCaps, Pattern, Plan
from arfuse.runtime import arguments
from arfuse.runtime.custom_op import register_executor, run_call
from arfuse.runtime.executor import Executor

Tensor = torch.Tensor
# The acceptance tests of the preparation step (arfuse.core.prepare): on unless ARFUSE_FAST_PATH=0 (read when a
# fusion object is built).
FAST_PATH_ENV = "ARFUSE_FAST_PATH"


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
        requested = arguments.check_backend_name(backend)
        timeout_s = arguments.check_timeout(timeout_s)
        device = arguments.normalize_device(device) if device is not None else arguments.default_device(group)
        self.capacity = Capacity(max_tokens, hidden_size, dtype, device, timeout_s)
        self._executor = Executor(group, self.capacity, requested, strict, table_path)
        try:
            arguments.check_requested_can_run(self._executor, requested, strict)
        except BaseException:
            self._executor.close()
            raise
        self._handle = register_executor(self._executor)
        self._finalizer = weakref.finalize(self, _close_at_exit, self._executor)
        self._preparation = Preparation(self.capacity, fast=settings.switch(FAST_PATH_ENV))

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
        op = opspecs.RESIDUAL_RMSNORM
        call = self._call(op.name, spec_for(op, weight_offset), inplace, FusedCall(
            x, norm_out, residual=residual, weight=weight, eps=eps, weight_offset=weight_offset,
            residual_out=residual_out))
        return call.out, call.residual_out

    def residual_rmsnorm_fp8(self, x: Tensor, residual: Tensor, weight: Tensor, scale: Union[float, Tensor],
                             eps: float = 1e-6, *, weight_offset: float = 0.0, quant_out: Optional[Tensor] = None,
                             residual_out: Optional[Tensor] = None, inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """As :meth:`residual_rmsnorm`, with the normed output quantized to FP8 e4m3:
        ``quant_out = clamp(norm / scale, -448, 448)`` (static per-tensor ``scale``: a float or a 1-element
        float32 tensor). Returns ``(quant_out, residual_out)``. Collective; graph-capturable. The general form
        is :meth:`residual_rmsnorm_quant` with :class:`arfuse.FP8Static`.
        """
        op = opspecs.RESIDUAL_RMSNORM_FP8
        call = self._call(op.name, spec_for(op, weight_offset), inplace, FusedCall(
            x, quant_out, residual=residual, weight=weight, eps=eps, weight_offset=weight_offset, scale=scale,
            residual_out=residual_out))
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
        op = opspecs.RESIDUAL_RMSNORM_QUANT
        call = self._call(op.name, spec_for(op, weight_offset, quant, also_norm), inplace, FusedCall(
            x, quant_out, residual=residual, weight=weight, eps=eps, weight_offset=weight_offset,
            scale=opspecs.static_scale(quant), residual_out=residual_out, norm_out=norm_out, scale_out=scale_out))
        return FusedOutput(call.out, call.scale_out if call.scale_out is not None else call.scale,
                           call.residual_out, call.norm_out)

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
        op = opspecs.MOE_FINALIZE_RESIDUAL_RMSNORM
        spec = spec_for(op, weight_offset, quant, also_norm, shared_expert_out is not None)
        quantized = quant is not None
        call = self._call(op.name, spec, inplace, FusedCall(
            expert_out, quant_out if quantized else norm_out, residual=residual, weight=weight, eps=eps,
            weight_offset=weight_offset, scale=opspecs.static_scale(quant), expert_idx=permuted_idx,
            expert_scales=expert_scales, shared=shared_expert_out, residual_out=residual_out,
            norm_out=norm_out if quantized else None, scale_out=scale_out))
        if not quantized:
            return FusedOutput(None, None, call.residual_out, call.out)
        return FusedOutput(call.out, call.scale_out if call.scale_out is not None else call.scale,
                           call.residual_out, call.norm_out)

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float = 1e-6, *, weight_offset: float = 0.0,
                out: Optional[Tensor] = None) -> Tensor:
        """``rmsnorm(allreduce(x)) * (weight + weight_offset)`` (no residual). Collective; graph-capturable."""
        op = opspecs.RMSNORM
        return self._call(op.name, spec_for(op, weight_offset), False, FusedCall(
            x, out, weight=weight, eps=eps, weight_offset=weight_offset)).out

    def all_reduce(self, x: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
        """Plain sum-allreduce of ``x`` into a new tensor (or ``out``). Collective; graph-capturable."""
        return self._call("all_reduce", _ALL_REDUCE, False, FusedCall(x, out)).out

    def run(self, spec: FusionSpec, call: FusedCall, *, op: Optional[str] = None) -> FusedCall:
        """Run one call of any ``spec``: ``call`` holds the caller's tensors by slot (outputs None to allocate).
        The generic form of the ops above (``arfuse.compile``'s fused calls use it), checked and prepared alike
        (errors name ``op``, default the spec's name). Returns ``call``, completed. Collective."""
        return self._call(op or spec.name, spec, False, call)

    def _call(self, op: str, spec: FusionSpec, inplace, call: FusedCall) -> FusedCall:
        """Prepare ``call`` (the caller's values by slot) for ``spec`` - checked before any collective, outputs
        allocated - and run it: straight on the executor when every argument passed its acceptance test, else
        through the ``torch.library`` op (traced calls, tensor subclasses). Returns the completed call."""
        executor, preparation = self._executor, self._preparation
        if executor.closed:
            raise ValueError(f"{op}: this AllReduceFusion is closed")
        if preparation.fast and preparation.accept(spec, call, inplace):
            executor.run(spec, call)
        else:
            preparation.check(op, spec, call, inplace)
            run_call(executor, self._handle, spec, call)
        return call

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
        spec = arguments.spec_arg("plan", pattern)
        arguments.check_tokens("plan", num_tokens, self.capacity.max_tokens)
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
        if self.closed:
            raise ValueError("input_buffer: this AllReduceFusion is closed")
        arguments.check_tokens("input_buffer", num_tokens, self.capacity.max_tokens)
        spec = arguments.spec_arg("input_buffer", pattern)
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


def free_idle_workspaces() -> int:
    """Destroy the workspaces backends keep for reuse after their last fusion object closed; returns how many.

    FlashInfer's workspace is kept for the next fusion object of the same group and hidden size, because
    recreating it leaks: FlashInfer 0.7.2's destroy drops its Python references but the device memory stayed
    mapped (40 MiB per cycle, measured). Destroying releases what the installed FlashInfer releases (all of it
    for releases whose destroy frees). Call it on every rank of a group at once: before FlashInfer 0.6 destroy
    has a barrier."""
    return sum(b.free_idle() for b in base.registered())
