"""Shared by the multi-rank and unit tests: a bounded gloo launch, the op matrix checked against the float64
reference, and the catalogue of bad inputs.

Worker functions passed to :func:`launch` must live at module level of a test module (spawned ranks import it).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

import arfuse
from arfuse import functional as F
from arfuse.backends.base import Support
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.core.spec import catalogue
from arfuse.core.types import FP8_DTYPE, Pattern
from arfuse.launch import run_ranks
from arfuse.verify import TOLERANCE, Case, checked_spec_call, digest, poison, reference, rel_err

LAUNCH_TIMEOUT_S = 240.0
# A machine shared with other work (bench/versions.py's sweeps) may stretch every bound by this factor.
TIMEOUT_SCALE = float(os.environ.get("ARFUSE_TEST_TIMEOUT_SCALE", "1"))
SMALL = 8  # SmallOnly refuses calls of more tokens than this


class SmallOnly(TorchRefBackend):
    """Test-only backend: the reference math under its own name, refusing calls of more than SMALL tokens."""

    name = "test_small_only"
    priority = 10
    needs_prepare_vote = True
    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def check_variant(self, problem, caps, variant):
        return f"test cap: more than {SMALL} tokens" if problem.num_tokens > SMALL else None


def launch(fn: Callable, world_size: int, *args, timeout_s: float = LAUNCH_TIMEOUT_S) -> list:
    """``run_ranks`` on CPU/gloo with a bound: a hung rank fails the test instead of stalling the suite."""
    return run_ranks(fn, world_size, *args, device="cpu", timeout_s=timeout_s * TIMEOUT_SCALE)


# -- the op matrix -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
    """One checked call on one rank: its errors against the float64 reference, digest and failed properties."""

    label: str
    errors: Dict[str, float]
    tolerance: float
    digest: str
    problems: List[str]
    tolerances: Optional[Dict[str, float]] = None  # per output, where they differ (quantized outputs)

    def failures(self) -> List[str]:
        tol = self.tolerances or {}
        bad = [f"{k} error {e:.3g} > {tol.get(k, self.tolerance):g}" for k, e in self.errors.items()
               if not e <= tol.get(k, self.tolerance)]
        return [f"{self.label}: {p}" for p in bad + self.problems]


class _Inputs:
    """One case's tensors on this rank, rebuilt fresh for each call so no call sees another's writes."""

    def __init__(self, case: Case, rank: int):
        self.case, self.rank = case, rank

    def x(self):
        return self.case.x(self.rank)

    def residual(self):
        return self.case.residual()

    def weight(self):
        return self.case.weight()


def _poisoned(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return poison(torch.empty(like.shape, dtype=dtype or like.dtype))


def _record(label, case, world, pattern, out, res_out, problems) -> Record:
    ref_out, ref_res = reference(case, world, pattern)
    errors = {"out": rel_err(out.reshape(ref_out.shape), ref_out)}
    if ref_res is not None:
        errors["residual"] = rel_err(res_out.reshape(ref_res.shape), ref_res)
    outputs = (out,) if res_out is None else (out, res_out)
    tolerance = TOLERANCE[FP8_DTYPE if out.dtype == FP8_DTYPE else case.dtype]
    return Record(label, errors, tolerance, digest(*outputs), problems)


def exercise(fusion: arfuse.AllReduceFusion, case: Case, rank: int, world: int, group=None) -> List[Record]:
    """Every public op on ``case`` (object, functional and module forms); each output checked. Collective.

    Outputs written by arfuse into caller tensors are poisoned with NaN first, so an unwritten element shows.
    """
    inp = _Inputs(case, rank)
    records: List[Record] = []
    R, R8, N, A = Pattern.RESIDUAL_RMSNORM, Pattern.RESIDUAL_RMSNORM_FP8, Pattern.RMSNORM, Pattern.ALLREDUCE

    def add(label, pattern, out, res_out, problems=()):
        records.append(_record(f"{label} tokens={case.tokens} {case.dtype}", case, world, pattern, out, res_out,
                               list(problems)))

    x, residual, weight = inp.x(), inp.residual(), inp.weight()
    norm, res = fusion.residual_rmsnorm(x, residual, weight, case.eps)
    add("residual_rmsnorm", R, norm, res, _unchanged(x=(x, inp.x()), residual=(residual, inp.residual())))

    x, residual = inp.x(), inp.residual()
    norm_out, res_out = _poisoned(x), _poisoned(x)
    norm, res = fusion.residual_rmsnorm(x, residual, inp.weight(), case.eps, norm_out=norm_out, residual_out=res_out)
    add("residual_rmsnorm caller outputs", R, norm, res,
        _same_object(norm=(norm, norm_out), residual_out=(res, res_out)))

    x, residual = inp.x(), inp.residual()
    norm, res = fusion.residual_rmsnorm(x, residual, inp.weight(), case.eps, inplace=True)
    add("residual_rmsnorm inplace", R, norm, res, _same_object(residual_out=(res, residual)))

    x, residual = inp.x(), inp.residual()
    quant_out = _poisoned(x, FP8_DTYPE)
    quant, res = fusion.residual_rmsnorm_fp8(x, residual, inp.weight(), case.scale, case.eps, quant_out=quant_out)
    add("residual_rmsnorm_fp8 caller output", R8, quant, res, _same_object(quant_out=(quant, quant_out)))

    x, residual = inp.x(), inp.residual()
    scale = torch.tensor([case.scale], dtype=torch.float32)
    quant, res = fusion.residual_rmsnorm_fp8(x, residual, inp.weight(), scale, case.eps, inplace=True)
    add("residual_rmsnorm_fp8 inplace tensor scale", R8, quant, res, _same_object(residual_out=(res, residual)))

    x = inp.x()
    add("rmsnorm", N, fusion.rmsnorm(x, inp.weight(), case.eps), None, _unchanged(x=(x, inp.x())))
    x = inp.x()
    out = _poisoned(x)
    add("rmsnorm caller output", N, fusion.rmsnorm(x, inp.weight(), case.eps, out=out), None)

    x = inp.x()
    add("all_reduce", A, fusion.all_reduce(x), None, _unchanged(x=(x, inp.x())))
    x = inp.x()
    out = _poisoned(x)
    got = fusion.all_reduce(x, out=out)
    add("all_reduce caller output", A, got, None, _same_object(out=(got, out)))

    add("functional.residual_rmsnorm", R,
        *F.residual_rmsnorm(inp.x(), inp.residual(), inp.weight(), case.eps, group=group))
    residual = inp.residual()
    norm, res = F.residual_rmsnorm(inp.x(), residual, inp.weight(), case.eps, group=group, inplace=True)
    add("functional.residual_rmsnorm inplace", R, norm, res, _same_object(residual_out=(res, residual)))
    add("functional.rmsnorm", N, F.rmsnorm(inp.x(), inp.weight(), case.eps, group=group), None)
    add("functional.all_reduce", A, F.all_reduce(inp.x(), group=group), None)

    module = arfuse.FusedAddRMSNorm(case.hidden, case.eps, fusion=fusion)
    with torch.no_grad():
        module.weight.copy_(inp.weight())
        x3, r3 = inp.x().view(1, case.tokens, case.hidden), inp.residual().view(1, case.tokens, case.hidden)
        y, r = module(x3, r3)
        add("FusedAddRMSNorm", R, y, r, _shape(y=(y, x3.shape), residual=(r, x3.shape)))
        add("FusedAddRMSNorm no residual", N, module(inp.x()), None)
        module.inplace_residual = True
        r3 = inp.residual().view(1, case.tokens, case.hidden)
        y, r = module(inp.x().view(1, case.tokens, case.hidden), r3)
        add("FusedAddRMSNorm inplace_residual", R, y, r, _same_object(residual=(r, r3)))
    return records


def exercise_specs(fusion: arfuse.AllReduceFusion, case: Case, rank: int, world: int, specs=None,
                   inplace: bool = True) -> List[Record]:
    """Every spec of ``specs`` (default: one of each kind, ``core.spec.catalogue``) through the public ops into
    NaN-poisoned outputs, each output checked against the float64 reference (quantized outputs by their
    dequantized error and scale formula); residual specs in place too. Collective."""
    records = []
    for spec in (specs or catalogue()):
        c = dataclasses.replace(case, weight_offset=1.0 if spec.weight_offset else 0.0)
        for in_place in ((False, True) if inplace and spec.residual else (False,)):
            checked = checked_spec_call(fusion, spec, c, rank, world, "cpu", inplace=in_place)
            records.append(Record(f"{spec.name}{' inplace' if in_place else ''} tokens={c.tokens} {c.dtype}",
                                  {k: e for k, (e, _) in checked.errors.items()}, TOLERANCE[c.dtype],
                                  checked.digest, [], {k: t for k, (_, t) in checked.errors.items()}))
    return records


OBJECT_CALLS_PER_EXERCISE = 12  # calls exercise() makes through the fusion object itself (module included)
RECORDS_PER_EXERCISE = 16  # checked calls per exercise(): the above plus 4 functional ones


def _unchanged(**pairs) -> List[str]:
    return [f"input {name} was modified" for name, (a, b) in pairs.items() if not torch.equal(a, b)]


def _same_object(**pairs) -> List[str]:
    return [f"returned {name} is not the caller's tensor" for name, (a, b) in pairs.items() if a is not b]


def _shape(**pairs) -> List[str]:
    return [f"{name} shape {tuple(t.shape)} != {tuple(s)}" for name, (t, s) in pairs.items() if t.shape != s]


def check_records(per_rank: Sequence[Sequence[Record]], context: str) -> int:
    """Assert every record passed on every rank and every output is bitwise identical across ranks.

    Returns how many records were checked per rank.
    """
    failures = [f"rank {r}: {f}" for r, recs in enumerate(per_rank) for rec in recs for f in rec.failures()]
    labels = [[rec.label for rec in recs] for recs in per_rank]
    assert all(lab == labels[0] for lab in labels), f"{context}: ranks ran different calls"
    for k, label in enumerate(labels[0]):
        digests = {recs[k].digest for recs in per_rank}
        if len(digests) != 1:
            failures.append(f"{label}: outputs differ across ranks")
    assert not failures, f"{context}:\n" + "\n".join(failures)
    return len(labels[0])


# -- bad inputs ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad call: what it is, the exception and the words its message must contain."""

    label: str
    call: Callable  # (fusion, inputs) -> None; raises
    error: type
    words: Sequence[str]


class Good:
    """Valid inputs for a fusion object of ``(max_tokens=MAX, hidden=H, float32, cpu)``."""

    MAX, H, N = 16, 64, 4

    def __init__(self, seed: int = 0, rank: int = 0):
        self.case = Case(self.N, self.H, torch.float32, seed)
        self.x, self.residual, self.weight = self.case.x(rank), self.case.residual(), self.case.weight()
        self.experts, self.idx = self.case.expert_out(rank), self.case.permuted_idx(rank)
        self.escales = self.case.expert_scales(rank)

    def moe(self, fusion, **changes):
        """``fusion.moe_finalize_residual_rmsnorm`` on these inputs with some replaced (keyword = argument)."""
        args = dict(expert_out=self.experts, permuted_idx=self.idx, expert_scales=self.escales,
                    residual=self.residual, weight=self.weight)
        kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
        args.update(changes)
        return fusion.moe_finalize_residual_rmsnorm(*args.values(), **kwargs)


def _meta(t):
    return t.to("meta")


def _noncontig(t):
    return t.t().contiguous().t()


def bad_inputs() -> List[Bad]:
    """Every locally checkable bad input, for every op form. Each raises before any collective."""
    H, MAX = Good.H, Good.MAX
    bf = torch.bfloat16
    cases = [
        Bad("x wrong dtype", lambda f, g: f.residual_rmsnorm(g.x.to(bf), g.residual, g.weight), TypeError,
            ("x", "dtype", "float32")),
        Bad("x wrong device", lambda f, g: f.residual_rmsnorm(_meta(g.x), g.residual, g.weight), ValueError,
            ("x", "cpu")),
        Bad("residual dtype mismatch", lambda f, g: f.residual_rmsnorm(g.x, g.residual.to(bf), g.weight), TypeError,
            ("residual", "dtype")),
        Bad("weight dtype mismatch", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight.to(bf)), TypeError,
            ("weight", "dtype")),
        Bad("residual wrong device", lambda f, g: f.residual_rmsnorm(g.x, _meta(g.residual), g.weight), ValueError,
            ("residual", "cpu")),
        Bad("weight wrong device", lambda f, g: f.residual_rmsnorm(g.x, g.residual, _meta(g.weight)), ValueError,
            ("weight", "cpu")),
        Bad("x 1-D", lambda f, g: f.residual_rmsnorm(g.x[0], g.residual[0], g.weight), ValueError, ("x", "2-D")),
        Bad("x 3-D", lambda f, g: f.residual_rmsnorm(g.x[None], g.residual[None], g.weight), ValueError, ("x", "2-D")),
        Bad("x not a tensor", lambda f, g: f.residual_rmsnorm(g.x.tolist(), g.residual, g.weight), TypeError,
            ("x", "Tensor")),
        Bad("x non-contiguous", lambda f, g: f.residual_rmsnorm(_noncontig(g.x), g.residual, g.weight), ValueError,
            ("x", "contiguous")),
        Bad("residual non-contiguous", lambda f, g: f.residual_rmsnorm(g.x, _noncontig(g.residual), g.weight),
            ValueError, ("residual", "contiguous")),
        Bad("residual shape", lambda f, g: f.residual_rmsnorm(g.x, g.residual[:-1], g.weight), ValueError,
            ("residual", "shape")),
        Bad("weight size != hidden", lambda f, g: f.residual_rmsnorm(g.x, g.residual, torch.ones(H + 1)), ValueError,
            ("weight", "shape", str(H))),
        Bad("hidden != capacity", lambda f, g: f.residual_rmsnorm(torch.ones(2, 2 * H), torch.ones(2, 2 * H),
                                                                   torch.ones(2 * H)), ValueError,
            ("x.shape[1]", "hidden_size", str(H))),
        Bad("more tokens than max_tokens", lambda f, g: f.residual_rmsnorm(torch.ones(MAX + 1, H),
                                                                            torch.ones(MAX + 1, H), g.weight),
            ValueError, ("tokens", "max_tokens", str(MAX))),
        Bad("eps = 0", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, 0.0), ValueError, ("eps", "> 0")),
        Bad("eps < 0", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, -1e-6), ValueError, ("eps",)),
        Bad("eps inf", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, float("inf")), ValueError,
            ("eps", "finite")),
        Bad("eps nan", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, float("nan")), ValueError,
            ("eps", "finite")),
        Bad("eps not a number", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, "1e-6"), TypeError,
            ("eps", "float")),
        Bad("norm_out wrong dtype", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight,
                                                                     norm_out=torch.empty(g.x.shape, dtype=bf)),
            TypeError, ("norm_out", "dtype")),
        Bad("residual_out wrong shape", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight,
                                                                         residual_out=torch.empty(1, H)),
            ValueError, ("residual_out", "shape")),
        Bad("norm_out aliases x", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, norm_out=g.x),
            ValueError, ("norm_out", "x", "share memory")),
        Bad("inplace and residual_out", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, inplace=True,
                                                                         residual_out=torch.empty_like(g.x)),
            ValueError, ("inplace", "residual_out")),
        Bad("fp8 scale <= 0", lambda f, g: f.residual_rmsnorm_fp8(g.x, g.residual, g.weight, 0.0), ValueError,
            ("scale", "> 0")),
        Bad("fp8 scale underflows float32", lambda f, g: f.residual_rmsnorm_fp8(g.x, g.residual, g.weight, 1e-50),
            ValueError, ("scale", "float32")),
        Bad("fp8 scale overflows float32", lambda f, g: f.residual_rmsnorm_fp8(g.x, g.residual, g.weight, 1e39),
            ValueError, ("scale", "float32")),
        Bad("eps underflows float32", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight, 1e-50), ValueError,
            ("eps", "float32")),
        Bad("fp8 scale tensor dtype", lambda f, g: f.residual_rmsnorm_fp8(g.x, g.residual, g.weight,
                                                                           torch.ones(1, dtype=bf)),
            TypeError, ("scale", "float32")),
        Bad("fp8 x wrong dtype", lambda f, g: f.residual_rmsnorm_fp8(g.x.to(bf), g.residual, g.weight, 1.0),
            TypeError, ("x", "dtype")),
        Bad("fp8 eps nan", lambda f, g: f.residual_rmsnorm_fp8(g.x, g.residual, g.weight, 1.0, float("nan")),
            ValueError, ("eps",)),
        Bad("rmsnorm weight dtype", lambda f, g: f.rmsnorm(g.x, g.weight.to(bf)), TypeError, ("weight", "dtype")),
        Bad("rmsnorm x non-contiguous", lambda f, g: f.rmsnorm(_noncontig(g.x), g.weight), ValueError,
            ("x", "contiguous")),
        Bad("rmsnorm eps <= 0", lambda f, g: f.rmsnorm(g.x, g.weight, -1.0), ValueError, ("eps",)),
        Bad("all_reduce x wrong dtype", lambda f, g: f.all_reduce(g.x.to(bf)), TypeError, ("x", "dtype")),
        Bad("all_reduce too many tokens", lambda f, g: f.all_reduce(torch.ones(MAX + 1, H)), ValueError,
            ("max_tokens",)),
        Bad("all_reduce out wrong shape", lambda f, g: f.all_reduce(g.x, out=torch.empty(1, H)), ValueError,
            ("out", "shape")),
        Bad("functional residual dtype", lambda f, g: F.residual_rmsnorm(g.x, g.residual.to(bf), g.weight),
            TypeError, ("residual", "dtype")),
        Bad("functional eps", lambda f, g: F.rmsnorm(g.x, g.weight, 0.0), ValueError, ("eps",)),
        Bad("functional x 1-D", lambda f, g: F.all_reduce(g.x[0]), ValueError, ("x", "2-D")),
        Bad("module residual dtype", lambda f, g: _module(f)(g.x, g.residual.to(bf)), TypeError,
            ("residual", "dtype")),
    ]
    return cases + bad_pattern_inputs()


def bad_pattern_inputs() -> List[Bad]:
    """The bad inputs of the weight-offset, dynamic-FP8 and MoE ops."""
    H, MAX, N = Good.H, Good.MAX, Good.N
    bf = torch.bfloat16
    group = arfuse.FP8PerTokenGroup(8, packed_ue8m0=True)

    def quant(f, g, **kw):
        return f.residual_rmsnorm_quant(g.x, g.residual, g.weight, **kw)

    return [
        Bad("weight_offset nan", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight,
                                                                  weight_offset=float("nan")),
            ValueError, ("weight_offset", "finite")),
        Bad("weight_offset not a number", lambda f, g: f.rmsnorm(g.x, g.weight, weight_offset="1"), TypeError,
            ("weight_offset", "float")),
        Bad("quant not a quantization", lambda f, g: quant(f, g, quant="fp8"), TypeError,
            ("quant", "FP8PerToken")),
        Bad("quant group_size not dividing hidden", lambda f, g: quant(f, g, quant=arfuse.FP8PerTokenGroup(48)),
            ValueError, ("group_size=48", "divide", str(H))),
        Bad("quant group_size 0", lambda f, g: quant(f, g, quant=arfuse.FP8PerTokenGroup(0)), ValueError,
            ("group_size", "positive")),
        Bad("quant also_norm not a bool", lambda f, g: quant(f, g, quant=arfuse.FP8PerToken(), also_norm=1),
            TypeError, ("also_norm", "bool")),
        Bad("quant x wrong dtype", lambda f, g: f.residual_rmsnorm_quant(g.x.to(bf), g.residual, g.weight,
                                                                          quant=arfuse.FP8PerToken()),
            TypeError, ("x", "dtype")),
        Bad("quant static scale <= 0", lambda f, g: quant(f, g, quant=arfuse.FP8Static(-1.0)), ValueError,
            ("scale", "> 0")),
        Bad("per-token scale_out wrong shape", lambda f, g: quant(f, g, quant=arfuse.FP8PerToken(),
                                                                  scale_out=torch.empty(N, 2)),
            ValueError, ("scale_out", "shape", f"({N}, 1)")),
        Bad("group scale_out wrong dtype", lambda f, g: quant(f, g, quant=arfuse.FP8PerTokenGroup(8),
                                                              scale_out=torch.empty(N, H // 8, dtype=bf)),
            TypeError, ("scale_out", "float32")),
        Bad("ue8m0 scale_out row-major", lambda f, g: quant(f, g, quant=group,
                                                            scale_out=torch.empty(N, 2, dtype=torch.int32)),
            ValueError, ("scale_out", "column-major")),
        Bad("quant_out wrong dtype", lambda f, g: quant(f, g, quant=arfuse.FP8PerToken(),
                                                        quant_out=torch.empty(N, H)),
            TypeError, ("quant_out", "float8_e4m3fn")),
        Bad("norm_out without also_norm", lambda f, g: quant(f, g, quant=arfuse.FP8PerToken(),
                                                             norm_out=torch.empty(N, H)),
            ValueError, ("norm_out", "not written")),
        Bad("quant inplace and residual_out", lambda f, g: quant(f, g, quant=arfuse.FP8PerToken(), inplace=True,
                                                                 residual_out=torch.empty(N, H)),
            ValueError, ("inplace", "residual_out")),
        Bad("moe idx int64", lambda f, g: g.moe(f, permuted_idx=g.idx.long()), TypeError,
            ("permuted_idx", "int32")),
        Bad("moe idx 1-D", lambda f, g: g.moe(f, permuted_idx=g.idx[:, 0].contiguous()), ValueError,
            ("permuted_idx", "2-D")),
        Bad("moe top_k 0", lambda f, g: g.moe(f, permuted_idx=g.idx[:, :0], expert_scales=g.escales[:, :0]),
            ValueError, ("permuted_idx", "top_k")),
        Bad("moe index past the rows", lambda f, g: g.moe(f, permuted_idx=torch.full_like(g.idx, N * 2)),
            ValueError, ("permuted_idx", f"outside [0, {N * 2})", "expert_out")),
        Bad("moe negative index", lambda f, g: g.moe(f, permuted_idx=torch.full_like(g.idx, -1)), ValueError,
            ("permuted_idx", "-1", "outside")),
        Bad("moe expert_scales shape", lambda f, g: g.moe(f, expert_scales=g.escales[:, :1].contiguous()),
            ValueError, ("expert_scales", "shape")),
        Bad("moe expert_scales int", lambda f, g: g.moe(f, expert_scales=g.idx), TypeError,
            ("expert_scales", "dtype")),
        Bad("moe expert_out hidden", lambda f, g: g.moe(f, expert_out=torch.ones(3, H + 8)), ValueError,
            ("expert_out", "hidden_size")),
        Bad("moe expert_out dtype", lambda f, g: g.moe(f, expert_out=g.experts.to(bf)), TypeError,
            ("expert_out", "dtype")),
        Bad("moe expert_out not a tensor", lambda f, g: g.moe(f, expert_out=None), TypeError,
            ("expert_out", "Tensor")),
        Bad("moe shared shape", lambda f, g: g.moe(f, shared_expert_out=torch.ones(N + 1, H)), ValueError,
            ("shared_expert_out", "shape")),
        Bad("moe residual tokens", lambda f, g: g.moe(f, residual=g.residual[:-1]), ValueError,
            ("residual", "shape")),
        Bad("moe too many tokens", lambda f, g: g.moe(f, permuted_idx=torch.zeros(MAX + 1, 2, dtype=torch.int32)),
            ValueError, ("max_tokens",)),
        Bad("moe quant group not dividing", lambda f, g: g.moe(f, quant=arfuse.FP8PerTokenGroup(48)), ValueError,
            ("group_size", "divide")),
        Bad("functional quant group not dividing",
            lambda f, g: F.residual_rmsnorm_quant(g.x, g.residual, g.weight, quant=arfuse.FP8PerTokenGroup(48)),
            ValueError, ("group_size", "divide")),
        Bad("functional moe idx dtype",
            lambda f, g: F.moe_finalize_residual_rmsnorm(g.experts, g.idx.long(), g.escales, g.residual, g.weight),
            TypeError, ("permuted_idx", "int32")),
    ]


def _module(fusion):
    return arfuse.FusedAddRMSNorm(Good.H, 1e-6, fusion=fusion)


def closed_calls() -> List[Bad]:
    """Every op on a closed fusion object: ValueError naming the op."""
    return [
        Bad("closed residual_rmsnorm", lambda f, g: f.residual_rmsnorm(g.x, g.residual, g.weight), ValueError,
            ("residual_rmsnorm", "closed")),
        Bad("closed residual_rmsnorm_fp8", lambda f, g: f.residual_rmsnorm_fp8(g.x, g.residual, g.weight, 1.0),
            ValueError, ("residual_rmsnorm_fp8", "closed")),
        Bad("closed rmsnorm", lambda f, g: f.rmsnorm(g.x, g.weight), ValueError, ("rmsnorm", "closed")),
        Bad("closed all_reduce", lambda f, g: f.all_reduce(g.x), ValueError, ("all_reduce", "closed")),
        Bad("closed module", lambda f, g: _module(f)(g.x, g.residual), ValueError, ("closed",)),
        Bad("closed residual_rmsnorm_quant", lambda f, g: f.residual_rmsnorm_quant(
            g.x, g.residual, g.weight, quant=arfuse.FP8PerToken()), ValueError, ("residual_rmsnorm_quant", "closed")),
        Bad("closed moe_finalize_residual_rmsnorm", lambda f, g: g.moe(f), ValueError,
            ("moe_finalize_residual_rmsnorm", "closed")),
    ]


def expect(bad: Bad, fusion, good: Good) -> Optional[str]:
    """Run ``bad``; return None if it raised the expected error with the expected words, else what happened."""
    try:
        bad.call(fusion, good)
    except bad.error as e:
        missing = [w for w in bad.words if w not in str(e)]
        return f"{bad.label}: message {str(e)!r} lacks {missing}" if missing else None
    except Exception as e:  # reported, not raised: the test lists every wrong case at once
        return f"{bad.label}: raised {type(e).__name__} ({e}), expected {bad.error.__name__}"
    return f"{bad.label}: did not raise"
