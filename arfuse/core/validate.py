"""Argument checks run on every rank before any collective starts.

Only what each rank can check locally is checked here. What needs other ranks' arguments (the same token count
and hidden size on every rank) is the caller's contract; a mismatch there is caught by the kernels' bounded waits
on GPU, not here.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from arfuse.core.types import Capacity

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0 or not _positive_in_float32(eps):
        raise ValueError(f"{op}: eps must be finite and > 0 in float32 (the kernels' precision), got {eps}")
    return eps


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINIEST = 2.0 ** -149  # the smallest positive float32 (subnormal)


def _positive_in_float32(value: float) -> bool:
    """Whether ``value`` stays a positive finite number when the kernels round it to float32 (plain comparisons,
    so ``torch.compile`` traces it without a graph break)."""
    return FLOAT32_TINIEST <= value <= FLOAT32_MAX


def _span(t: torch.Tensor):
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory ranges intersect (an empty tensor overlaps nothing)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False  # different allocations never overlap
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def check_tensor(op: str, name: str, t, *, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
    """``t`` must be a contiguous tensor of ``shape``, ``dtype`` and ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() first)")
    return t


def check_input(op: str, x, capacity: Capacity) -> int:
    """``x`` is the (tokens, hidden) input; return its token count."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (tokens, hidden), got {x.dim()}-D shape {tuple(x.shape)}")
    if x.dtype != capacity.dtype:
        raise TypeError(f"{op}: x must have dtype {dtype_name(capacity.dtype)} (the fusion object's dtype), "
                        f"got {dtype_name(x.dtype)}")
    if x.device != capacity.device:
        raise ValueError(f"{op}: x must be on {capacity.device} (the fusion object's device), got {x.device}")
    if x.shape[1] != capacity.hidden_size:
        raise ValueError(f"{op}: x.shape[1] must equal hidden_size={capacity.hidden_size}, got {x.shape[1]}")
    if x.shape[0] > capacity.max_tokens:
        raise ValueError(f"{op}: x has {x.shape[0]} tokens, more than max_tokens={capacity.max_tokens}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous (call .contiguous() first)")
    return x.shape[0]


def check_scale(op: str, scale, device: torch.device) -> torch.Tensor:
    """The FP8 scale: a positive finite float, or a one-element float32 tensor on the device."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype != torch.float32:
            raise TypeError(f"{op}: scale must be a one-element float32 tensor, got {scale.dtype} "
                            f"with {scale.numel()} elements")
        if scale.device != device:
            raise ValueError(f"{op}: scale must be on {device}, got {scale.device}")
        return scale.reshape(1)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a float or a float32 tensor, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0 or not _positive_in_float32(scale):
        raise ValueError(f"{op}: scale must be finite and > 0 in float32, got {scale}")
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def check_outputs_disjoint(op: str, outputs: dict, inputs: dict, allowed: Optional[tuple] = None) -> None:
    """No output may share memory with an input or another output (except the allowed in-place pair)."""
    names = list(outputs)
    for i, oname in enumerate(names):
        o = outputs[oname]
        for other in names[i + 1:]:
            if overlaps(o, outputs[other]):
                raise ValueError(f"{op}: {oname} and {other} must not share memory")
        for iname, t in inputs.items():
            if t is None or allowed == (oname, iname):
                continue
            if overlaps(o, t):
                raise ValueError(f"{op}: {oname} must not share memory with {iname}")


def check_weight_offset(op: str, weight_offset) -> float:
    """The norm's weight offset (``weight + weight_offset``, Gemma-style): a finite float."""
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
        raise TypeError(f"{op}: weight_offset must be a float, got {type(weight_offset).__name__}")
    weight_offset = float(weight_offset)
    if not math.isfinite(weight_offset) or abs(weight_offset) > FLOAT32_MAX:
        raise ValueError(f"{op}: weight_offset must be finite in float32, got {weight_offset}")
    return weight_offset


def check_group_size(op: str, group_size: int, hidden: int) -> None:
    if hidden % group_size:
        raise ValueError(f"{op}: quant group_size={group_size} must divide hidden_size={hidden}")


def check_moe(op: str, expert_out, permuted_idx, expert_scales, shared, capacity: Capacity) -> int:
    """The MoE finalize inputs: ``expert_out`` (P, hidden), ``permuted_idx`` int32 (tokens, top_k) with every index
    in ``[0, P)`` (checked here for CPU tensors; GPU paths guard it in the kernel), ``expert_scales`` (tokens,
    top_k) float32 or the fusion dtype, optional ``shared`` (tokens, hidden). Returns the token count."""
    cap = capacity
    if not isinstance(expert_out, torch.Tensor):
        raise TypeError(f"{op}: expert_out must be a torch.Tensor, got {type(expert_out).__name__}")
    if expert_out.dim() != 2 or expert_out.shape[1] != cap.hidden_size:
        raise ValueError(f"{op}: expert_out must be 2-D (rows, hidden_size={cap.hidden_size}), got shape "
                         f"{tuple(expert_out.shape)}")
    if expert_out.dtype != cap.dtype:
        raise TypeError(f"{op}: expert_out must have dtype {dtype_name(cap.dtype)} (the fusion object's dtype), "
                        f"got {dtype_name(expert_out.dtype)}")
    if expert_out.device != cap.device:
        raise ValueError(f"{op}: expert_out must be on {cap.device} (the fusion object's device), got "
                         f"{expert_out.device}")
    if not expert_out.is_contiguous():
        raise ValueError(f"{op}: expert_out must be contiguous (call .contiguous() first)")
    if not isinstance(permuted_idx, torch.Tensor):
        raise TypeError(f"{op}: permuted_idx must be a torch.Tensor, got {type(permuted_idx).__name__}")
    if permuted_idx.dtype != torch.int32:
        raise TypeError(f"{op}: permuted_idx must have dtype int32, got {dtype_name(permuted_idx.dtype)}")
    if permuted_idx.dim() != 2 or permuted_idx.shape[1] < 1:
        raise ValueError(f"{op}: permuted_idx must be 2-D (tokens, top_k) with top_k >= 1, got shape "
                         f"{tuple(permuted_idx.shape)}")
    tokens, top_k = permuted_idx.shape
    if tokens > cap.max_tokens:
        raise ValueError(f"{op}: permuted_idx has {tokens} tokens, more than max_tokens={cap.max_tokens}")
    if permuted_idx.device != cap.device or not permuted_idx.is_contiguous():
        raise ValueError(f"{op}: permuted_idx must be contiguous on {cap.device}, got {permuted_idx.device}"
                         f"{'' if permuted_idx.is_contiguous() else ' (strided)'}")
    if not isinstance(expert_scales, torch.Tensor):
        raise TypeError(f"{op}: expert_scales must be a torch.Tensor, got {type(expert_scales).__name__}")
    if expert_scales.dtype not in (torch.float32, cap.dtype):
        raise TypeError(f"{op}: expert_scales must have dtype float32 or {dtype_name(cap.dtype)}, got "
                        f"{dtype_name(expert_scales.dtype)}")
    check_tensor(op, "expert_scales", expert_scales, dtype=expert_scales.dtype, device=cap.device,
                 shape=(tokens, top_k))
    if shared is not None:
        check_tensor(op, "shared_expert_out", shared, dtype=cap.dtype, device=cap.device,
                     shape=(tokens, cap.hidden_size))
    if tokens and expert_out.shape[0] == 0:
        raise ValueError(f"{op}: expert_out has no rows for permuted_idx to index")
    if not torch.compiler.is_compiling():  # traced calls are checked when the op runs (runtime.custom_op)
        check_moe_indices(op, permuted_idx, expert_out.shape[0])
    return tokens


def check_moe_indices(op: str, permuted_idx: torch.Tensor, rows: int) -> None:
    """Every index of a CPU ``permuted_idx`` in ``[0, rows)``. GPU tensors are not read here (that would wait for
    the device): their kernels guard each index (see ``backends.base.IndexGuard``)."""
    if permuted_idx.device.type != "cpu" or permuted_idx.numel() == 0:
        return
    lo, hi = int(permuted_idx.min()), int(permuted_idx.max())
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: permuted_idx holds {bad}, outside [0, {rows}) (the rows of expert_out)")


def check_int_arg(op: str, name: str, value) -> int:
    """``value`` must be an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    return value


def check_module_args(op: str, capacity: Capacity, hidden_size, eps, dtype, device, inplace_residual) -> float:
    """A norm module's arguments against the fusion object it runs through; returns ``eps`` as a float. Every
    mismatch would otherwise fail only at the first call."""
    check_int_arg(op, "hidden_size", hidden_size)
    if hidden_size != capacity.hidden_size:
        raise ValueError(f"{op}: hidden_size must equal the fusion object's hidden_size={capacity.hidden_size}, "
                         f"got {hidden_size}")
    eps = check_eps(op, eps)
    if dtype is not None and dtype != capacity.dtype:
        raise TypeError(f"{op}: dtype must be the fusion object's dtype {dtype_name(capacity.dtype)} (or None), "
                        f"got {dtype}")
    if device is not None:
        try:
            same = torch.device(device).type == capacity.device.type and (
                torch.device(device).index in (None, capacity.device.index))
        except (RuntimeError, TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(f"{op}: device must be the fusion object's device {capacity.device} (or None), "
                             f"got {device!r}")
    if not isinstance(inplace_residual, bool):
        raise TypeError(f"{op}: inplace_residual must be a bool, got {type(inplace_residual).__name__}")
    return eps


def check_functional_input(op: str, x, name: str = "x") -> None:
    """What a functional call needs of ``x`` to pick its cached fusion object, checked here so that a bad ``x``
    is blamed on ``op: x`` and not on the object's constructor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (tokens, hidden), got {x.dim()}-D shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype float32, bfloat16 or float16, got {dtype_name(x.dtype)}")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: {name} must have a hidden size > 0, got shape {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} must be on a cpu or cuda device, got {x.device}")
