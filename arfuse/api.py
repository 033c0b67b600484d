"""The public fusion object: allreduce + residual add + RMSNorm (and plain allreduce, RMSNorm, FP8 epilogue)."""
from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Dict, Optional, Tuple, Union

import torch

from arfuse.backends import base
from arfuse.core import validate as v
from arfuse.core.counters import StatsView, logger, resolve_strict
from arfuse.core.errors import FallbackError
from arfuse.core.types import FP8_DTYPE, Capacity, GroupCaps, Pattern, Plan
from arfuse.probe import vote
from arfuse.runtime.custom_op import call, register_executor
from arfuse.runtime.executor import Executor
from arfuse.select import policy

Tensor = torch.Tensor
DEFAULT_TIMEOUT_S = 10.0


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
        timeout_s = float(os.environ.get("ARFUSE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"AllReduceFusion: timeout_s must be a number, got {type(timeout_s).__name__}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"AllReduceFusion: timeout_s must be finite and > 0, got {timeout_s}")
    return float(timeout_s)


def _check_requested_can_run(executor: Executor, requested: str, strict: Optional[bool]) -> None:
    """In strict mode, a named backend none of whose plans can run (every pattern and token count would fall
    back) is refused at construction, not at the first call. The plans are computed alike on every rank from the
    agreed capabilities, so every rank raises together."""
    if requested == policy.AUTO or not resolve_strict(strict):
        return
    plans = [p for rows in executor.plans.values() for p in rows if p is not None]
    if plans and all(p.fallback for p in plans):
        raise FallbackError(policy.parse_request(requested)[0], plans[0].reason)


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

    # -- the ops ---------------------------------------------------------------------------------------------
    def residual_rmsnorm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                         norm_out: Optional[Tensor] = None, residual_out: Optional[Tensor] = None,
                         inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """``residual_out = allreduce(x) + residual``; ``norm_out = rmsnorm(residual_out) * weight``.

        Math in fp32, outputs in the input dtype. ``inplace=True`` writes ``residual_out`` into ``residual``
        (what engines do). Optional ``norm_out``/``residual_out`` are written instead of new tensors.
        Returns ``(norm_out, residual_out)``. Collective; graph-capturable.
        """
        return self._residual_call("residual_rmsnorm", Pattern.RESIDUAL_RMSNORM, x, residual, weight, eps, None,
                                   norm_out, residual_out, inplace, self.capacity.dtype)

    def residual_rmsnorm_fp8(self, x: Tensor, residual: Tensor, weight: Tensor, scale: Union[float, Tensor],
                             eps: float = 1e-6, *, quant_out: Optional[Tensor] = None,
                             residual_out: Optional[Tensor] = None, inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """As :meth:`residual_rmsnorm`, with the normed output quantized to FP8 e4m3:
        ``quant_out = clamp(norm / scale, -448, 448)`` (static per-tensor ``scale``: a float or a 1-element
        float32 tensor). Returns ``(quant_out, residual_out)``. Collective; graph-capturable.
        """
        scale_t = v.check_scale("residual_rmsnorm_fp8", scale, self.capacity.device)
        return self._residual_call("residual_rmsnorm_fp8", Pattern.RESIDUAL_RMSNORM_FP8, x, residual, weight, eps,
                                   scale_t, quant_out, residual_out, inplace, FP8_DTYPE)

    def rmsnorm(self, x: Tensor, weight: Tensor, eps: float = 1e-6, *, out: Optional[Tensor] = None) -> Tensor:
        """``rmsnorm(allreduce(x)) * weight`` (no residual). Collective; graph-capturable."""
        op = "rmsnorm"
        self._check_open(op)
        v.check_input(op, x, self.capacity)
        v.check_weight(op, weight, self.capacity)
        eps = v.check_eps(op, eps)
        provided = out is not None
        out = self._output(op, "out", out, x, self.capacity.dtype)
        if provided:
            self._check_disjoint(op, {"out": out}, {"x": x, "weight": weight})
        call(self._executor, self._handle, Pattern.RMSNORM, x, None, weight, None, eps, out, None)
        return out

    def all_reduce(self, x: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
        """Plain sum-allreduce of ``x`` into a new tensor (or ``out``). Collective; graph-capturable."""
        op = "all_reduce"
        self._check_open(op)
        v.check_input(op, x, self.capacity)
        provided = out is not None
        out = self._output(op, "out", out, x, self.capacity.dtype)
        if provided:
            self._check_disjoint(op, {"out": out}, {"x": x})
        call(self._executor, self._handle, Pattern.ALLREDUCE, x, None, None, None, 1.0, out, None)
        return out

    def _residual_call(self, op, pattern, x, residual, weight, eps, scale, out, residual_out, inplace, out_dtype):
        self._check_open(op)
        cap = self.capacity
        v.check_input(op, x, cap)
        v.check_tensor(op, "residual", residual, dtype=cap.dtype, device=cap.device, shape=tuple(x.shape))
        v.check_weight(op, weight, cap)
        eps = v.check_eps(op, eps)
        if not isinstance(inplace, bool):
            raise TypeError(f"{op}: inplace must be a bool, got {type(inplace).__name__}")
        if inplace and residual_out is not None:
            raise ValueError(f"{op}: pass either inplace=True or residual_out, not both")
        # Only caller-provided memory can overlap anything, so fresh outputs skip the (costly) overlap check.
        given = {}
        out_name = "quant_out" if scale is not None else "norm_out"
        if out is not None:
            given[out_name] = out
        if inplace or residual_out is not None:
            given["residual_out"] = residual if inplace else residual_out
        out = self._output(op, out_name, out, x, out_dtype)
        res_out = residual if inplace else self._output(op, "residual_out", residual_out, x, cap.dtype)
        if given:
            self._check_disjoint(op, {k: (out if k == out_name else res_out) for k in given},
                                 {"x": x, "residual": residual, "weight": weight},
                                 allowed=("residual_out", "residual") if inplace else None)
        call(self._executor, self._handle, pattern, x, None if inplace else residual, weight, scale, eps, out,
             res_out)
        return out, res_out

    @staticmethod
    def _output(op: str, name: str, given: Optional[Tensor], x: Tensor, dtype: torch.dtype) -> Tensor:
        if given is None:
            return torch.empty(x.shape, dtype=dtype, device=x.device)
        return v.check_tensor(op, name, given, dtype=dtype, device=x.device, shape=tuple(x.shape))

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

    def plan(self, pattern: Union[Pattern, str], num_tokens: int) -> Plan:
        """The plan a call of ``num_tokens`` tokens would run (``pattern``: a Pattern or its name)."""
        pattern = Pattern[pattern.upper()] if isinstance(pattern, str) else Pattern(pattern)
        if not 1 <= num_tokens <= self.capacity.max_tokens:
            raise ValueError(f"plan: num_tokens must be in 1..{self.capacity.max_tokens}, got {num_tokens}")
        return self._executor.plan(pattern, num_tokens)

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

    def input_buffer(self, num_tokens: int, pattern: Pattern = Pattern.RESIDUAL_RMSNORM) -> Optional[Tensor]:
        """A (num_tokens, hidden) tensor in the chosen backend's own input memory, or None.

        Writing the input there (e.g. as a GEMM's ``out=``) and passing it as ``x`` skips the copy-in.
        The contents are valid until the next call that uses this backend.
        """
        self._check_open("input_buffer")
        if not 1 <= num_tokens <= self.capacity.max_tokens:
            raise ValueError(f"input_buffer: num_tokens must be in 1..{self.capacity.max_tokens}, got {num_tokens}")
        return self._executor.input_buffer(pattern, num_tokens)

    def check_health(self) -> None:
        """Raise the error a previous launch recorded asynchronously (e.g. :class:`PeerTimeoutError`)."""
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
