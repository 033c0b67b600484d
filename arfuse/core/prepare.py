"""The one preparation step of every call: its arguments checked against the operand schema, its missing outputs
allocated, its :class:`~arfuse.core.types.FusedCall` completed.

A public op puts the caller's values into a ``FusedCall`` by slot (outputs None where the caller gave none) and
hands it with its spec to :meth:`Preparation.accept`, and when that declines, to :meth:`Preparation.check`. Each
operand of the spec (:mod:`arfuse.core.operands`) first gets a cheap acceptance test: an exact tensor type (``torch.Tensor``, or ``nn.Parameter`` for all but the
input), its dtype, shape, contiguity and device compared with what the table says, ``float`` scalars in range,
caller outputs that cannot overlap anything - one straight-line function per spec, generated from the table
(:mod:`arfuse.core.accept`). When every operand passes, the outputs are allocated and the call is ready. When any
test fails - a bad argument, or just an unusual one (a tensor subclass, an ``int`` eps, a traced call, memory that
might overlap, a caller's packed UE8M0 ``scale_out``) - the full checks of the same table run:
they raise ValueError/TypeError naming the op and the argument (before any collective), or accept the call and
normalise it (eps as a float, the static scale as a tensor). The acceptance tests accept nothing the full checks
refuse, so a bad input raises the same error either way.

Nothing is cached about tensors: every call reads every argument afresh. The one cache is the float32 tensor of a
static FP8 scale given as a float (one device fill per call otherwise), per value, dropped when the tensor is
written (its version counter or data pointer changes), and never used while a CUDA graph is being captured.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from arfuse.core import operands as ops
from arfuse.core import validate as v
from arfuse.core.accept import Accept, compile_accept
from arfuse.core.operands import Layout, Operand, Shape
from arfuse.core.spec import FusionSpec, Quant
from arfuse.core.types import Capacity, FusedCall

Tensor = torch.Tensor
_FLOAT32, _INT32 = torch.float32, torch.int32
_is_compiling = torch.compiler.is_compiling
MAX_SCALES = 16  # cached static-scale tensors per fusion object


class Preparation:
    """One fusion object's preparation step (see the module docstring). ``fast=False``: every call takes the full
    checks (``ARFUSE_FAST_PATH=0``)."""

    def __init__(self, capacity: Capacity, fast: bool = True):
        self.capacity, self.device, self.max_tokens = capacity, capacity.device, capacity.max_tokens
        self.cuda = capacity.device.type == "cuda"
        self.fast = fast
        self.scales: Dict[float, tuple] = {}
        self.tests: Dict[int, Accept] = {}  # by spec code

    # -- the acceptance tests ------------------------------------------------------------------------------------
    def accept(self, spec: FusionSpec, call: FusedCall, inplace) -> bool:
        """Complete ``call`` and return True if every argument passes its cheap test (the spec's generated
        function, :mod:`arfuse.core.accept`); else False, ``call`` as it was."""
        if _is_compiling():  # traced: the full checks (no data pointers, nothing to generate code in)
            return False
        test = self.tests.get(spec.code)
        if test is None:
            test = self.tests[spec.code] = compile_accept(spec, self.capacity, dict(
                moe_tokens=self._moe_tokens, static_scale=self._scale, may_overlap=_may_overlap))
        return test(call, inplace)

    def _moe_tokens(self, call: FusedCall) -> int:
        """The token count if the MoE routing passes its tests (``x``, the expert rows, already did), else -1."""
        idx, escales, device = call.expert_idx, call.expert_scales, self.device
        if type(idx) is not Tensor or idx.dtype is not _INT32 or not idx.is_contiguous() or idx.device != device:
            return -1
        s = idx.shape
        if len(s) != 2 or s[1] < 1 or s[0] > self.max_tokens:
            return -1
        dtype = self.capacity.dtype
        if type(escales) is not Tensor or (escales.dtype is not _FLOAT32 and escales.dtype is not dtype) \
                or escales.shape != s or not escales.is_contiguous() or escales.device != device:
            return -1
        n = s[0]
        if n and call.x.shape[0] == 0:  # routes into no rows: the full check names it
            return -1
        if n and not self.cuda:  # CPU: the index range, as the full check does (GPU kernels guard it)
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= call.x.shape[0]:
                return -1
        return n

    def _scale(self, scale) -> Optional[Tensor]:
        """The static FP8 scale as the full check makes it, or None."""
        if type(scale) is Tensor:
            if scale.dtype is not _FLOAT32 or scale.numel() != 1 or scale.device != self.device:
                return None
            return scale if scale.dim() == 1 else scale.reshape(1)
        if type(scale) is not float or not v.FLOAT32_TINIEST <= scale <= v.FLOAT32_MAX:
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

    # -- the full checks -----------------------------------------------------------------------------------------
    def check(self, op: str, spec: FusionSpec, call: FusedCall, inplace) -> None:
        """The full checks of every operand of ``spec``, in the table's order (inputs, scalars, then outputs and
        their aliasing); raise the first problem (``call`` left as it was), else complete ``call``."""
        if _is_compiling():  # traced: a refused call raises out of the graph anyway
            self._check(op, spec, call, inplace)
            return
        saved = [getattr(call, slot) for slot in FusedCall.__slots__]
        try:
            self._check(op, spec, call, inplace)
        except BaseException:
            for slot, value in zip(FusedCall.__slots__, saved):
                setattr(call, slot, value)
            raise

    def _check(self, op: str, spec: FusionSpec, call: FusedCall, inplace) -> None:
        cap = self.capacity
        x = call.x
        if spec.moe:
            tokens = v.check_moe(op, x, call.expert_idx, call.expert_scales, call.shared, cap)
        else:
            tokens = v.check_input(op, x, cap)
        rows = (tokens, cap.hidden_size)
        for operand in ops.inputs(spec):
            if operand.slot in ("residual", "weight"):
                shape = rows if operand.shape is Shape.ROWS else (cap.hidden_size,)
                v.check_tensor(op, operand.arg, getattr(call, operand.slot), dtype=cap.dtype, device=cap.device,
                               shape=shape)
                if operand.slot == "weight":
                    call.eps = v.check_eps(op, call.eps)
        if not spec.norm:
            call.eps = 1.0
        if spec.group_size:
            v.check_group_size(op, spec.group_size, cap.hidden_size)
        call.weight_offset = v.check_weight_offset(op, call.weight_offset)
        if call.weight_offset != 0.0 and not spec.weight_offset:
            raise ValueError(f"{op}: weight_offset is {call.weight_offset}, but {spec.name} has no weight offset "
                             f"(FusionSpec(weight_offset=True))")
        taken = {o.slot for o in ops.inputs(spec)}
        for slot in ops.INPUT_SLOTS:
            if slot not in taken and getattr(call, slot) is not None:
                raise ValueError(f"{op}: {slot} is not an input of this call ({spec.name})")
        call.scale = v.check_scale(op, call.scale, cap.device) if spec.quant is Quant.FP8_STATIC else None
        if not isinstance(inplace, bool):
            raise TypeError(f"{op}: inplace must be a bool, got {type(inplace).__name__}")
        if inplace and call.residual_out is not None:
            raise ValueError(f"{op}: pass either inplace=True or residual_out, not both")
        given = self._check_outputs(op, spec, call, tokens, inplace)
        if given and not _is_compiling():  # data pointers do not exist while tracing
            names = {o.slot: o.arg for o in ops.operands(spec)}
            inputs = {names[s]: getattr(call, s) for s in ops.INPUT_SLOTS if s in names and s != "scale"}
            v.check_outputs_disjoint(op, {names[s]: getattr(call, s) for s in given}, inputs,
                                     allowed=("residual_out", "residual") if inplace else None)
        call.num_tokens = tokens

    def _check_outputs(self, op: str, spec: FusionSpec, call: FusedCall, tokens: int, inplace: bool) -> list:
        """Check each caller output against its operand, allocate the others; the slots the caller gave (the
        in-place residual included)."""
        cap = self.capacity
        given = []
        for operand in ops.outputs(spec):
            t = getattr(call, operand.slot)
            if t is None and operand.slot == "residual_out" and inplace:
                t = call.residual
            if t is None:
                t = ops.allocate(operand, spec, tokens, cap.hidden_size, cap.dtype, cap.device)
            else:
                check_output(op, operand, spec, t, tokens, cap)
                given.append(operand.slot)
            setattr(call, operand.slot, t)
        written = ops.names(spec)
        for slot in ops.OUTPUT_SLOTS:
            if slot not in written and getattr(call, slot) is not None:
                raise ValueError(f"{op}: {slot} is not written by this call ({spec.name})")
        return given


def check_output(op: str, operand: Operand, spec: FusionSpec, t, tokens: int, cap: Capacity) -> Tensor:
    """A caller's output ``t`` must be what :func:`arfuse.core.operands.allocate` would make for ``operand``."""
    shape = ops.shape_of(operand, spec, tokens, cap.hidden_size)
    want = operand.torch_dtype(cap.dtype)
    if operand.layout is not Layout.UE8M0:
        return v.check_tensor(op, operand.arg, t, dtype=want, device=cap.device, shape=shape)
    label = operand.arg
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != want or t.device != torch.device(cap.device) or tuple(t.shape) != shape:
        raise ValueError(f"{op}: {label} must be an int32 tensor of shape {shape} on {cap.device}, got "
                         f"{v.dtype_name(t.dtype)} {tuple(t.shape)} on {t.device}")
    stride = ops.packed_strides(tokens)
    if (shape[1] > 1 and t.stride()[1] != stride[1]) or (tokens > 1 and t.stride()[0] != 1):
        raise ValueError(f"{op}: {label} must be column-major with the token stride padded to a multiple of 4 "
                         f"(strides {stride}, as arfuse.core.math.ue8m0_empty makes), got {t.stride()}")
    return t


def _may_overlap(call: FusedCall, given: list, inplace: bool) -> bool:
    """Whether any pair the full check tests may share memory (then the full check decides): the caller's outputs
    (and, in place, the residual as ``residual_out``) with each other and with every input, the in-place pair
    excepted."""
    outs = [(t.data_ptr(), t.nbytes, False) for t in given]
    if inplace:
        outs.append((call.residual.data_ptr(), call.residual.nbytes, True))
    ins = [(t.data_ptr(), t.nbytes, slot == "residual") for slot, t in _tensor_inputs(call)]
    for i, (lo, size, is_inplace_residual) in enumerate(outs):
        hi = lo + size
        for other in outs[i + 1:]:
            if other[0] < hi and lo < other[0] + other[1]:
                return True
        for p, nbytes, is_residual_input in ins:
            if is_residual_input and is_inplace_residual:
                continue  # the allowed in-place pair
            if p < hi and lo < p + nbytes:
                return True
    return False


def _tensor_inputs(call: FusedCall) -> Tuple[Tuple[str, Tensor], ...]:
    """The call's input tensors by slot (the static scale excepted: arfuse's own or read-only)."""
    return tuple((s, t) for s, t in (("x", call.x), ("residual", call.residual), ("weight", call.weight),
                                     ("expert_idx", call.expert_idx), ("expert_scales", call.expert_scales),
                                     ("shared", call.shared)) if t is not None)
