"""What the fusion pass matches, as data: one :class:`Entry` per (RMSNorm spelling, residual form, epilogue, dtype
form) and the arfuse op it becomes.

A pattern is the post-grad graph of ``allreduce -> [row views] -> [residual add] -> [row views] -> RMSNorm ->
[FP8 quantization]``. The norm, the residual form and the epilogue are traced from the torch code of
``arfuse.autofuse.spellings`` (``tracing``), once per process, so they hold the aten ops this torch release
decomposes that code into; the allreduce itself is the functional collective's own two ops (``all_reduce`` +
``wait_tensor``), and the row views (``views.RowViews``) let any reshape/squeeze/unsqueeze that keeps rows sit
where the arrows are. Inductor's pattern matcher has no commutativity, so each operand order the source can have
is its own spelling. A new spelling or epilogue joins by adding to the lists below (and, for a new arfuse op, a
:class:`Replacement` in ``arfuse.autofuse.replace``), not by editing the pass. The values a pattern leaves open
(``KeywordArg``) are checked by ``arfuse.autofuse.checks`` before anything is replaced.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Callable, List, Optional, Tuple

import torch
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, MultiOutputPattern, PatternExpr

from arfuse.autofuse import spellings, tracing
from arfuse.autofuse.views import RowViews
from arfuse.core.counters import logger

c10d = torch.ops._c10d_functional

ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default
CONVERT = torch.ops.prims.convert_element_type.default

# trace shapes: (tokens, hidden) activations, a (hidden,) weight, a one-element float32 FP8 scale
_TOKENS, _HIDDEN = 4, 8


@dataclasses.dataclass(frozen=True)
class Norm:
    """One RMSNorm spelling.

    ``family``: ``"hf_rmsnorm"`` (HF ``LlamaRMSNorm``/``Qwen2RMSNorm``), ``"torch_rms_norm"`` (``F.rms_norm`` and
    ``nn.RMSNorm``: the operand order and the casts are its decomposition's) or ``"offset_rmsnorm"`` (Gemma's
    ``offset + weight`` in fp32, which arfuse takes as ``weight_offset``; only the bf16/fp16 form needs it: in fp32
    the offset weight is just another weight tensor). ``weight``: HF's ``"after_cast"`` (``weight * y.to(dtype)``)
    or ``"before_cast"`` (``(y * weight).to(dtype)``); in fp32 no casts exist and only after_cast is kept.
    ``weight_first``: operand order of the weight multiply (None: the decomposition's).
    """

    family: str
    weight: str = "after_cast"
    weight_first: Optional[bool] = None

    @property
    def weight_offset(self) -> bool:
        return self.family == "offset_rmsnorm"

    @property
    def default_weight(self) -> bool:
        return self.weight == "after_cast" or self.family != "hf_rmsnorm"

    def function(self) -> Callable:
        if self.family == "hf_rmsnorm":
            return spellings.hf_rmsnorm(self.weight == "after_cast", self.weight_first)
        if self.family == "offset_rmsnorm":
            return spellings.offset_rmsnorm(self.weight_first)
        return spellings.torch_rms_norm

    def label(self, casts: bool) -> str:
        if self.weight_first is None:
            return self.family
        order = "weight_first" if self.weight_first else "weight_last"
        position = "" if self.default_weight else f"/weight_{self.weight}"
        return f"{self.family}{position if casts else ''}/{order}"


NORMS = [Norm("hf_rmsnorm", weight, first) for weight in ("after_cast", "before_cast") for first in (True, False)]
NORMS += [Norm("torch_rms_norm")]
NORMS += [Norm("offset_rmsnorm", "before_cast", first) for first in (True, False)]


@dataclasses.dataclass(frozen=True)
class Residual:
    """How the allreduced sum reaches the norm: directly (``add`` False), or added to a residual in the form
    ``spellings.RESIDUAL_FORMS[form]`` (an operand order, optionally the branch multiplied by a constant; ``form``
    defaults to ``name``). ``addend``: the sum first gets another term added in the form
    ``spellings.ADDEND_FORMS[addend]`` (a shared expert's output); the fused call then takes ``residual + addend``
    as its residual, which reorders the float additions (equal up to rounding; the report says so)."""

    name: str
    add: bool
    scaled: bool = False
    form: Optional[str] = None
    addend: Optional[str] = None

    @property
    def outer(self) -> str:
        return self.form or self.name


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """A quantization of the norm's output, traced from ``spellings.<name>``. ``float_scale``: the scale is a
    Python float (a constant of the graph) rather than a tensor input."""

    name: str
    float_scale: bool = False


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
    Residual("residual+sum", add=True),
    Residual("sum+residual", add=True),
    Residual("residual+sum*m", add=True, scaled=True),
    Residual("sum*m+residual", add=True, scaled=True),
    Residual("residual+(sum+addend)", add=True, form="residual+sum", addend="sum+addend"),
    Residual("residual+(addend+sum)", add=True, form="residual+sum", addend="addend+sum"),
    Residual("(sum+addend)+residual", add=True, form="sum+residual", addend="sum+addend"),
    Residual("(addend+sum)+residual", add=True, form="sum+residual", addend="addend+sum"),
]  # the plain forms first: of two that match, the one without reordered additions is taken
EPILOGUES = [Epilogue("fp8_static"), Epilogue("fp8_static_float_scale", float_scale=True), None]

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
        if not casts and (not norm.default_weight or norm.weight_offset):
            continue  # without casts neither the weight position nor a weight upcast exists
        name = "/".join(p for p in ("lowp" if casts else "fp32", norm.label(casts), res.name, epi and epi.name)
                        if p)
        out.append(Entry(name, op, casts, norm, res, epi, stage=0))
    return out + [PLAIN_ALL_REDUCE]


# -- building the pattern expressions ----------------------------------------------------------------------------

def allreduced() -> PatternExpr:
    """``wait_tensor(all_reduce(x, "sum", group))``; its users are checked by the :class:`RowViews` around it."""
    return CallFunction(WAIT, CallFunction(ALL_REDUCE, KeywordArg("x"), "sum", KeywordArg("group")),
                        _users=MULTIPLE)


def _act(dtype: torch.dtype, shape=(_TOKENS, _HIDDEN)):
    return shape, dtype


def _norm(entry: Entry, norm_input: Callable[[int], PatternExpr], dtype: torch.dtype, out_users) -> PatternExpr:
    expected = ("eps", "dims") + (("weight_offset",) if entry.norm.weight_offset else ())
    return tracing.traced_pattern(entry.norm.function(), [_act(dtype), _act(dtype, (_HIDDEN,))],
                                  [norm_input, KeywordArg("weight")], dtype, out_users, expected)


def _epilogue(entry: Entry, normed: Callable[[int], PatternExpr], dtype: torch.dtype) -> PatternExpr:
    epi = entry.epilogue
    fn = getattr(spellings, epi.name)
    if epi.float_scale:
        return tracing.traced_pattern(fn, [_act(dtype)], [normed], dtype, MULTIPLE, ("qmin", "qmax", "scale"))
    return tracing.traced_pattern(fn, [_act(dtype), ((1,), torch.float32)], [normed, KeywordArg("scale")], dtype,
                                  MULTIPLE, ("qmin", "qmax"))


def build(entry: Entry) -> PatternExpr:
    """The pattern expression of ``entry``: a single output, or ``(norm output, residual sum)``."""
    if entry.norm is None:
        return allreduced()
    dtype = torch.bfloat16 if entry.casts else torch.float32
    res = entry.residual
    total = None
    if res.add:
        branch = (lambda users: RowViews(allreduced(), "sum_views", users))
        if res.addend is not None:
            summed = tracing.traced_pattern(spellings.ADDEND_FORMS[res.addend], [_act(dtype), _act(dtype)],
                                            [branch, KeywordArg("addend")], dtype, MULTIPLE)
            branch = (lambda users: RowViews(summed, "addend_views", users))
        total = tracing.traced_pattern(spellings.RESIDUAL_FORMS[res.outer], [_act(dtype), _act(dtype)],
                                       [KeywordArg("residual"), branch], dtype, MULTIPLE,
                                       ("multiplier",) if res.scaled else ())
        norm_input = (lambda users: RowViews(total, "norm_views", users, inner_is_output=True))
    else:
        norm_input = (lambda users: RowViews(allreduced(), "sum_views", users))
    if entry.epilogue is None:
        out = _norm(entry, norm_input, dtype, MULTIPLE)
    else:
        out = _epilogue(entry, lambda users: _norm(entry, norm_input, dtype, users), dtype)
    return MultiOutputPattern([out, total]) if total is not None else out


# The patterns every graph is matched against, per stage; built once per process.
_cache: List[Tuple[Entry, PatternExpr]] = []
_failed: List[Tuple[Entry, str]] = []


def compiled_entries() -> List[Tuple[Entry, PatternExpr]]:
    """Every entry with its pattern, built on first use. An entry whose spelling does not trace into a pattern on
    this torch is left out (logged, and listed by :func:`unbuilt`); one whose pattern equals an earlier entry's
    (two spellings this torch decomposes alike) is left out too, so the report names the first."""
    if not _cache and not _failed:
        seen = {}  # (stage, repr) -> patterns: repr spells out the whole tree, pattern_eq confirms
        for e in entries():
            try:
                pattern = e.pattern()
            except tracing.TraceError as err:
                _failed.append((e, str(err)))
                logger.log(logging.WARNING, "arfuse.compile: pattern %s not built: %s", e.name, err)
                continue
            same = seen.setdefault((e.stage, repr(pattern)), [])
            if not any(pattern.pattern_eq(p) for p in same):
                same.append(pattern)
                _cache.append((e, pattern))
    return _cache


def unbuilt() -> List[Tuple[Entry, str]]:
    """The entries :func:`compiled_entries` left out because their spelling did not trace, with the reason."""
    compiled_entries()
    return list(_failed)
