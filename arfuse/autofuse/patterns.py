"""What the fusion pass matches, as data: one :class:`Entry` per (RMSNorm spelling, residual form, epilogue) and
the arfuse op it becomes.

A pattern is the post-grad (functionalized, decomposed) graph of
``allreduce -> [residual add] -> RMSNorm -> [FP8 quantization]``. Inductor's pattern matcher has no
commutativity, so each operand order is its own entry; :func:`entries` generates them from the lists below. A new
spelling or epilogue joins by adding to these lists (and, for a new arfuse op, a :class:`Replacement` in
``arfuse.autofuse.replace``), not by editing the pass. The values a pattern leaves open (``KeywordArg``) are
checked by ``arfuse.autofuse.checks`` before anything is replaced.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, List, Optional, Tuple

import torch
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, MultiOutputPattern, PatternExpr

aten = torch.ops.aten
prims = torch.ops.prims
c10d = torch.ops._c10d_functional

ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default
CONVERT = prims.convert_element_type.default


@dataclasses.dataclass(frozen=True)
class Norm:
    """One RMSNorm spelling.

    ``family``: ``"hf_rmsnorm"`` (HF ``LlamaRMSNorm``/``Qwen2RMSNorm``: ``pow(2).mean(-1, keepdim=True)``,
    ``rsqrt(var + eps)`` as ``add.Tensor``) or ``"torch_rms_norm"`` (``F.rms_norm``/``nn.RMSNorm``'s
    decomposition: positive reduction dim, ``add.Scalar``). ``weight``: ``"after_cast"`` (``weight * y.to(dtype)``,
    HF's) or ``"before_cast"`` (``(y * weight).to(dtype)``, torch's); in fp32 no casts exist and only the
    family's own position is kept. ``weight_first``: operand order of the weight multiply. ``weight_offset``:
    the norm multiplies by ``weight.float() + offset`` (Gemma's ``1 + weight``), which arfuse takes as
    ``weight_offset``; only the bf16/fp16 form needs it (in fp32 the offset weight is just another weight tensor).
    """

    family: str
    eps_add: object
    weight: str
    weight_first: bool
    weight_offset: bool = False

    @property
    def default_weight(self) -> bool:
        return self.weight == FAMILIES[self.family][1]

    def label(self, casts: bool) -> str:
        order = "weight_first" if self.weight_first else "weight_last"
        position = "" if self.default_weight else f"/weight_{self.weight}"
        return f"{self.family}{position if casts else ''}/{order}"


FAMILIES = {"hf_rmsnorm": (aten.add.Tensor, "after_cast"), "torch_rms_norm": (aten.add.Scalar, "before_cast"),
            "offset_rmsnorm": (aten.add.Tensor, "before_cast")}
NORMS = [Norm(family, eps_add, weight, first)
         for family, (eps_add, _) in FAMILIES.items() if family != "offset_rmsnorm"
         for weight in ("after_cast", "before_cast")
         for first in (True, False)]
NORMS += [Norm("offset_rmsnorm", aten.add.Tensor, "before_cast", first, weight_offset=True) for first in (True, False)]


@dataclasses.dataclass(frozen=True)
class Residual:
    """How the allreduced sum reaches the norm: directly (``None`` kind), or added to a residual in an operand
    order, optionally multiplied by a constant first (``residual + out * m``)."""

    name: str
    add: bool
    sum_first: bool = False
    scaled: bool = False


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """A quantization of the norm's output. ``clamp_in_fp32``: the clamp of a bf16/fp16 quotient runs on an
    fp32 upcast and is cast back before the FP8 cast (how Inductor decomposes it in some graphs)."""

    name: str
    clamp_in_fp32: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """One pattern and the arfuse op that replaces it (``op``: a key of ``replace.REPLACEMENTS``)."""

    name: str
    op: str
    casts: bool  # the bf16/fp16 form (fp32 upcast and downcast around the norm) or the fp32 form (no casts)
    norm: Optional[Norm]
    residual: Optional[Residual]
    epilogue: Optional[Epilogue]
    stage: int  # entries of a lower stage are tried on the whole graph first
    device_types: Tuple[str, ...] = ("cpu", "cuda")

    def pattern(self) -> PatternExpr:
        return build(self)


RESIDUALS = [
    Residual("no_residual", add=False),
    Residual("residual+sum", add=True, sum_first=False),
    Residual("sum+residual", add=True, sum_first=True),
    Residual("residual+sum*m", add=True, sum_first=False, scaled=True),
    Residual("sum*m+residual", add=True, sum_first=True, scaled=True),
]
EPILOGUES = [Epilogue("fp8_static"), Epilogue("fp8_static_clamp_in_fp32", clamp_in_fp32=True), None]

# (has residual, fp8 epilogue) -> the arfuse op
OPS = {(True, False): "residual_rmsnorm", (True, True): "residual_rmsnorm_fp8", (False, False): "rmsnorm"}

PLAIN_ALL_REDUCE = Entry("plain_all_reduce", "all_reduce", casts=False, norm=None, residual=None, epilogue=None,
                         stage=1, device_types=("cuda",))
"""A plain allreduce, fused into arfuse's ``all_reduce`` where arfuse has a fast path for it (CUDA: its own
kernels and FlashInfer; on CPU/gloo arfuse would run the same ``torch.distributed.all_reduce``)."""


def entries() -> List[Entry]:
    """Every pattern, most specific first (an FP8 epilogue before the same norm without it)."""
    out = []
    for epi, casts, norm, res in itertools.product(EPILOGUES, (True, False), NORMS, RESIDUALS):
        op = OPS.get((res.add, epi is not None))
        if op is None:
            continue
        if not casts and (not norm.default_weight or norm.weight_offset or (epi is not None and epi.clamp_in_fp32)):
            continue  # without casts neither the weight position, a weight upcast nor an fp32 clamp exists
        name = "/".join(p for p in ("lowp" if casts else "fp32", norm.label(casts), res.name, epi and epi.name)
                        if p)
        out.append(Entry(name, op, casts, norm, res, epi, stage=0))
    return out + [PLAIN_ALL_REDUCE]


# -- building the pattern expressions ----------------------------------------------------------------------------

def _allreduced(users) -> PatternExpr:
    return CallFunction(WAIT, CallFunction(ALL_REDUCE, KeywordArg("x"), "sum", KeywordArg("group")), _users=users)


def _mul(a, b, first_is_b: bool, **kw) -> PatternExpr:
    return CallFunction(aten.mul.Tensor, *((b, a) if first_is_b else (a, b)), **kw)


def _norm(h: PatternExpr, entry: Entry, out_users) -> PatternExpr:
    """The RMSNorm of ``h`` (its input node, whose users the caller set)."""
    norm = entry.norm
    up = CallFunction(CONVERT, h, KeywordArg("up_dtype"), _users=2) if entry.casts else h
    mean = CallFunction(aten.mean.dim, CallFunction(aten.pow.Tensor_Scalar, up, 2), KeywordArg("dims"), True)
    rsqrt = CallFunction(aten.rsqrt.default, CallFunction(norm.eps_add, mean, KeywordArg("eps")))
    normed = CallFunction(aten.mul.Tensor, up, rsqrt)
    weight = KeywordArg("weight")
    if norm.weight_offset:
        weight = CallFunction(aten.add.Tensor, CallFunction(CONVERT, weight, KeywordArg("weight_up_dtype")),
                              KeywordArg("weight_offset"))
    if not entry.casts:
        return _mul(normed, weight, norm.weight_first, _users=out_users)
    if norm.weight == "after_cast":
        return _mul(CallFunction(CONVERT, normed, KeywordArg("out_dtype")), weight, norm.weight_first,
                    _users=out_users)
    return CallFunction(CONVERT, _mul(normed, weight, norm.weight_first), KeywordArg("out_dtype"), _users=out_users)


def _fp8(y: PatternExpr, epilogue: Epilogue) -> PatternExpr:
    quotient = CallFunction(aten.div.Tensor, y, KeywordArg("scale"))
    if epilogue.clamp_in_fp32:
        quotient = CallFunction(CONVERT, quotient, KeywordArg("clamp_up_dtype"))
    clamped = CallFunction(aten.clamp_max.default,
                           CallFunction(aten.clamp_min.default, quotient, KeywordArg("qmin")), KeywordArg("qmax"))
    if epilogue.clamp_in_fp32:
        clamped = CallFunction(CONVERT, clamped, KeywordArg("clamp_down_dtype"))
    return CallFunction(CONVERT, clamped, KeywordArg("q_dtype"), _users=MULTIPLE)


def build(entry: Entry) -> PatternExpr:
    """The pattern expression of ``entry``: a single output, or ``(norm output, residual sum)``."""
    if entry.norm is None:
        return _allreduced(MULTIPLE)
    res = entry.residual
    epi = entry.epilogue
    finish: Callable[[PatternExpr], PatternExpr] = (lambda y: _fp8(y, epi)) if epi is not None else (lambda y: y)
    out_users = 1 if entry.epilogue is not None else MULTIPLE
    if not res.add:
        # the sum feeds only the norm: its upcast in bf16, or the norm's pow and mul in fp32
        return finish(_norm(_allreduced(1 if entry.casts else 2), entry, out_users))
    branch = _allreduced(1)
    if res.scaled:
        branch = CallFunction(aten.mul.Tensor, branch, KeywordArg("multiplier"))
    residual = KeywordArg("residual")
    total = CallFunction(aten.add.Tensor, *((branch, residual) if res.sum_first else (residual, branch)),
                         _users=MULTIPLE)
    return MultiOutputPattern([finish(_norm(total, entry, out_users)), total])


# The patterns every graph is matched against, per stage; built once per process.
_cache: List[Tuple[Entry, PatternExpr]] = []


def compiled_entries() -> List[Tuple[Entry, PatternExpr]]:
    if not _cache:
        _cache.extend((e, e.pattern()) for e in entries())
    return _cache
