"""The eager call's fast path: the checks of :mod:`arfuse.core.validate` and :mod:`arfuse.core.outputs` for the
calls that pass them, in a few attribute reads and comparisons per argument, and the call's outputs allocated.

:meth:`FastChecks.call` either returns the :class:`~arfuse.core.types.FusedCall` the checked path would build for
the same arguments, or None - without raising, running or counting anything - whenever any argument is not one it
recognises as valid: then the caller runs the checked path, which raises the precise error naming the argument
(or accepts what the fast path was too strict for). It only *accepts* what the checked path accepts, so every bad
input still raises the same error before any collective. It is stricter than the checked path: exact tensor types
(``torch.Tensor``, and ``nn.Parameter`` for everything but ``x``; subclasses, fake and functional tensors take the
checked path), ``float`` scalars, no ``torch.compile`` tracing, and any possible memory overlap between a
caller-provided output and another tensor, or a packed UE8M0 ``scale_out`` from the caller, sends the call to the
checked path too.

Nothing is cached about tensors: every call reads every argument's dtype, device, shape and contiguity afresh
(reading them costs what comparing them does, so a cache keyed on them would save nothing, and tensor identity is
not enough). The one cache is the float32 tensor of a static FP8 scale passed as a float (one CUDA fill kernel per
call otherwise), per value, dropped when the tensor's version counter or data pointer changes (an in-place write),
and never used while a CUDA graph is being captured (the capture makes its own, as the checked path does).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from arfuse.core.math import ue8m0_empty
from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
from arfuse.core.types import FP8_DTYPE, Capacity, FusedCall
from arfuse.core.validate import FLOAT32_MAX, FLOAT32_TINIEST

Tensor = torch.Tensor
Parameter = torch.nn.Parameter
_FLOAT32 = torch.float32
_INT32 = torch.int32
_is_compiling = torch.compiler.is_compiling
_empty, _empty_like = torch.empty, torch.empty_like
MAX_SCALES = 16  # cached static-scale tensors per fusion object


def finite_float(value) -> bool:
    """``value`` is a float finite in float32 (what ``check_weight_offset`` accepts, for floats)."""
    return type(value) is float and -FLOAT32_MAX <= value <= FLOAT32_MAX


class FastChecks:
    """One fusion object's fast path (see the module docstring)."""

    __slots__ = ("dtype", "device", "hidden", "max_tokens", "weight_shape", "cuda", "scales", "facts")

    def __init__(self, capacity: Capacity):
        self.dtype, self.device = capacity.dtype, capacity.device
        self.hidden, self.max_tokens = capacity.hidden_size, capacity.max_tokens
        self.weight_shape = torch.Size((capacity.hidden_size,))
        self.cuda = capacity.device.type == "cuda"
        self.scales: Dict[float, tuple] = {}
        self.facts: Dict[int, tuple] = {}  # spec code -> what call() reads of the spec

    def call(self, spec: FusionSpec, x, residual, weight, eps, weight_offset: float, scale, inplace, out,
             residual_out, norm_out, scale_out, idx=None, escales=None, shared=None) -> Optional[FusedCall]:
        """The checked path's call for these arguments, its fresh outputs allocated, or None (see the module
        docstring). ``weight_offset`` is already a float (its check is the op's). ``idx``, ``escales``,
        ``shared``: the MoE finalize inputs (``x`` is then ``expert_out``)."""
        if _is_compiling() or type(x) is not Tensor:
            return None
        facts = self.facts.get(spec.code) or self._facts(spec)
        moe, has_residual, norm, groups_ok, static, quant, also_norm, layout, groups = facts
        dtype, device, hidden = self.dtype, self.device, self.hidden
        xs = x.shape
        if len(xs) != 2 or xs[1] != hidden or x.dtype is not dtype or not x.is_contiguous() or x.device != device \
                or not groups_ok:
            return None
        if moe:
            n = self._moe_tokens(x, idx, escales, shared)
            if n < 0:
                return None
            shape = (n, hidden)
        else:
            if idx is not None or escales is not None or shared is not None:
                return None
            n, shape = xs[0], xs
            if n > self.max_tokens:
                return None
        if has_residual:
            if not (type(residual) is Tensor or type(residual) is Parameter) or residual.dtype is not dtype \
                    or residual.shape != shape or not residual.is_contiguous() or residual.device != device:
                return None
        elif residual is not None:
            return None
        if norm:
            if not (type(weight) is Tensor or type(weight) is Parameter) or weight.dtype is not dtype \
                    or weight.shape != self.weight_shape or not weight.is_contiguous() or weight.device != device:
                return None
            if type(eps) is not float or not FLOAT32_TINIEST <= eps <= FLOAT32_MAX:
                return None
        elif weight is not None:
            return None
        scale_t = None
        if static:
            scale_t = self._scale(scale)
            if scale_t is None:
                return None
        elif scale is not None:
            return None
        if inplace is not False and (inplace is not True or residual_out is not None or not has_residual):
            return None
        given = None if out is None and residual_out is None and norm_out is None and scale_out is None else \
            [t for t in (out, residual_out, norm_out, scale_out) if t is not None]
        # -- outputs: the caller's, checked as check_given does, else one empty tensor each
        if out is None:
            out = _empty(n, hidden, dtype=FP8_DTYPE, device=device) if quant else \
                _empty_like(residual if moe else x)
        elif not _plain(out, FP8_DTYPE if quant else dtype, shape, device):
            return None
        if has_residual:
            if inplace:
                residual_out = residual
            elif residual_out is None:
                residual_out = _empty_like(residual)
            elif not _plain(residual_out, dtype, shape, device):
                return None
        elif residual_out is not None:
            return None
        if also_norm:
            if norm_out is None:
                norm_out = _empty_like(residual if moe else x)  # (tokens, hidden) in the input dtype
            elif not _plain(norm_out, dtype, shape, device):
                return None
        elif norm_out is not None:
            return None
        if layout:
            if layout is ScaleLayout.UE8M0:
                if scale_out is not None:
                    return None  # its packed layout's strides: the checked path
                scale_out = ue8m0_empty(n, groups, device)
            elif scale_out is None:
                scale_out = _empty(n, groups, dtype=_FLOAT32, device=device)
            elif not _plain(scale_out, _FLOAT32, (n, groups), device):
                return None
        elif scale_out is not None:
            return None
        if (given is not None or inplace) and self._may_overlap(given or (), inplace, x, residual, weight, idx,
                                                                  escales, shared):
            return None
        return FusedCall.make(x, out, residual, weight, eps if norm else 1.0, weight_offset, scale_t, idx,
                              escales, shared, residual_out, norm_out, scale_out, n)

    def _facts(self, spec: FusionSpec) -> tuple:
        """What :meth:`call` reads of ``spec``, as plain values (enum and property reads cost ~0.1 µs each)."""
        facts = (spec.moe, spec.residual, spec.norm, not (spec.group_size and self.hidden % spec.group_size),
                 spec.quant is Quant.FP8_STATIC, spec.quant is not Quant.NONE, spec.also_norm,
                 spec.scale_layout if spec.scale_layout is not ScaleLayout.NONE else None, spec.groups(self.hidden))
        self.facts[spec.code] = facts
        return facts

    def _moe_tokens(self, expert_out, idx, escales, shared) -> int:
        """The token count if the MoE inputs pass ``check_moe`` (``expert_out`` already checked), else -1."""
        device = self.device
        if type(idx) is not Tensor or idx.dtype is not _INT32 or not idx.is_contiguous() or idx.device != device:
            return -1
        s = idx.shape
        if len(s) != 2 or s[1] < 1 or s[0] > self.max_tokens:
            return -1
        if type(escales) is not Tensor or (escales.dtype is not _FLOAT32 and escales.dtype is not self.dtype) \
                or escales.shape != s or not escales.is_contiguous() or escales.device != device:
            return -1
        n = s[0]
        if shared is not None and not _plain(shared, self.dtype, (n, self.hidden), device):
            return -1
        if n and not self.cuda:  # CPU: the index range, as check_moe does (GPU kernels guard it)
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= expert_out.shape[0]:
                return -1
        return n

    def _scale(self, scale) -> Optional[Tensor]:
        """The static FP8 scale as ``check_scale`` makes it, or None."""
        if type(scale) is Tensor:
            if scale.dtype is not _FLOAT32 or scale.numel() != 1 or scale.device != self.device:
                return None
            return scale if scale.dim() == 1 else scale.reshape(1)
        if type(scale) is not float or not FLOAT32_TINIEST <= scale <= FLOAT32_MAX:
            return None
        if self.cuda and torch.cuda.is_current_stream_capturing():
            return torch.full((1,), scale, dtype=_FLOAT32, device=self.device)  # the graph's own, as checked
        cached = self.scales.get(scale)
        if cached is not None:
            t, version, ptr = cached
            if t._version == version and t.data_ptr() == ptr:
                return t
        if len(self.scales) >= MAX_SCALES:
            self.scales.clear()
        with torch.inference_mode(False):  # a tensor with a version counter, whatever mode the call runs in
            t = torch.full((1,), scale, dtype=_FLOAT32, device=self.device)
        self.scales[scale] = (t, t._version, t.data_ptr())
        return t

    @staticmethod
    def _may_overlap(given, inplace, x, residual, weight, idx, escales, shared) -> bool:
        """Whether any pair ``check_outputs_disjoint`` checks may share memory (then the checked path decides):
        the caller's outputs (and, in place, the residual as ``residual_out``) with each other and with every
        input, the in-place pair excepted."""
        outs = [(t.data_ptr(), t.nbytes, False) for t in given]
        if inplace:
            outs.append((residual.data_ptr(), residual.nbytes, True))
        # (address, bytes, is the residual input slot) - by position: the residual may be x itself
        ins = [(t.data_ptr(), t.nbytes, slot == 1) for slot, t in enumerate((x, residual, weight, idx, escales,
                                                                             shared)) if t is not None]
        for i, (lo, size, is_inplace_residual) in enumerate(outs):
            hi = lo + size
            for other in outs[i + 1:]:
                if other[0] < hi and lo < other[0] + other[1]:
                    return True
            for p, n, is_residual_input in ins:
                if is_residual_input and is_inplace_residual:
                    continue  # the allowed in-place pair
                if p < hi and lo < p + n:
                    return True
        return False


def _plain(t, dtype, shape, device) -> bool:
    """``t`` passes ``check_tensor(dtype=dtype, device=device, shape=shape)`` (exact tensor types only)."""
    return (type(t) is Tensor or type(t) is Parameter) and t.dtype is dtype and t.shape == shape \
        and t.is_contiguous() and t.device == device
