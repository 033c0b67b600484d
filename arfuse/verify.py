"""Float64 oracle and reproducible per-rank inputs, shared by the demo, the benchmark, the tuner and the tests.

Every rank can rebuild every other rank's input from the seed, so the float64 reference needs no communication.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from arfuse.core import operands
from arfuse.core.math import GROUP_MIN_SCALE, PER_TOKEN_MIN_SCALE, unpack_ue8m0
from arfuse.core.quant import FP8PerToken, FP8PerTokenGroup, FP8Static
from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
from arfuse.core.types import FP8_MAX, Pattern

# Worst relative error (||out - ref|| / ||ref||) accepted per output dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float8_e4m3fn: 7e-2}


@dataclass(frozen=True)
class Case:
    """One call's inputs: ``x`` per rank (fresh random each), shared ``residual`` and ``weight``; for the MoE
    prologue, per rank ``expert_out`` (``expert_rows`` x hidden; default tokens * top_k rows), ``permuted_idx``,
    ``expert_scales`` and ``shared_expert_out``. ``on``: the device the inputs are drawn on and the float64
    reference is computed on (the CPU by default; a GPU for large checks: other random values, same seeds)."""

    tokens: int
    hidden: int
    dtype: torch.dtype
    seed: int
    eps: float = 1e-6
    scale: float = 0.05
    weight_offset: float = 0.0
    top_k: int = 2
    expert_rows: int = 0
    on: str = "cpu"

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator(self.on).manual_seed(self.seed * 1_000_003 + salt)

    def _randn(self, *shape: int, salt: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self._gen(salt), device=self.on)

    def x(self, rank: int, device="cpu") -> torch.Tensor:
        return self._randn(self.tokens, self.hidden, salt=17 + rank).to(self.dtype).to(device)

    def residual(self, device="cpu") -> torch.Tensor:
        return self._randn(self.tokens, self.hidden, salt=1).to(self.dtype).to(device)

    def weight(self, device="cpu") -> torch.Tensor:
        w = 1.0 + 0.1 * self._randn(self.hidden, salt=2)
        if self.weight_offset:  # Gemma-style weights sit near 0 and the offset adds 1
            w = w - self.weight_offset
        return w.to(self.dtype).to(device)

    @property
    def rows(self) -> int:
        return self.expert_rows or max(1, self.tokens * self.top_k)

    def expert_out(self, rank: int, device="cpu") -> torch.Tensor:
        return self._randn(self.rows, self.hidden, salt=1000 + rank).to(self.dtype).to(device)

    def permuted_idx(self, rank: int, device="cpu") -> torch.Tensor:
        g = self._gen(2000 + rank)
        return torch.randint(0, self.rows, (self.tokens, self.top_k), generator=g, dtype=torch.int32,
                             device=self.on).to(device)

    def expert_scales(self, rank: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
        g = self._gen(3000 + rank)
        return torch.rand(self.tokens, self.top_k, generator=g, device=self.on).softmax(dim=-1).to(dtype).to(device)

    def shared_expert_out(self, rank: int, device="cpu") -> torch.Tensor:
        return (0.5 * self._randn(self.tokens, self.hidden, salt=4000 + rank)).to(self.dtype).to(device)

    def rank_input(self, rank: int, spec: FusionSpec, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's allreduce input in float64 (the MoE finalize of its expert rows for the MoE prologue;
        ``idx`` replaces its indices, and an index outside ``[0, P)`` adds nothing, as the kernels promise)."""
        if not spec.moe:
            return self.x(rank, self.on).double()
        idx = (self.permuted_idx(rank, self.on) if idx is None else idx.to(self.on)).long()
        valid = (idx >= 0) & (idx < self.rows)
        rows = self.expert_out(rank, self.on).double()[idx.clamp(0, self.rows - 1)]
        weights = self.expert_scales(rank, self.on).double() * valid
        x = (rows * weights.unsqueeze(-1)).sum(dim=1)
        return x + self.shared_expert_out(rank, self.on).double() if spec.shared_expert else x


def reference(case: Case, world_size: int, pattern: Pattern) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, residual_out) in float64 for a classic ``pattern`` (out before FP8 rounding for the FP8 pattern)."""
    ref = reference_outputs(case, world_size, pattern.spec)
    return ref["out"], ref.get("residual_out")


def reference_outputs(case: Case, world_size: int, spec: FusionSpec,
                      rank_idx: Optional[Dict[int, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The float64 reference of every output ``spec`` writes for ``case``'s inputs (see :func:`reference_from_sum`).
    ``rank_idx``: MoE indices that replace some ranks' own (see :meth:`Case.rank_input`). On ``case.on``."""
    rank_idx = rank_idx or {}
    s = sum(case.rank_input(r, spec, rank_idx.get(r)) for r in range(world_size))
    return reference_from_sum(spec, s, case.residual(case.on) if spec.residual else None,
                              case.weight(case.on) if spec.norm else None, case.eps,
                              case.weight_offset if spec.weight_offset else 0.0, case.scale)


def reference_from_sum(spec: FusionSpec, s: torch.Tensor, residual: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor], eps: float, weight_offset: float = 0.0,
                       scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """The float64 reference of every output ``spec`` writes, from the allreduced sum ``s`` (tokens, hidden) of the
    ranks' float64 inputs: ``out`` (the sum, the norm or, for a quantization, the quantized value before FP8
    rounding), ``residual_out``, ``norm`` (the norm, whenever there is one) and, for dynamic quantizations,
    ``scale_out`` (float64 (tokens, groups), before any UE8M0 rounding). ``scale``: the static FP8 scale."""
    s = s.double()
    if not spec.norm:
        return {"out": s}
    ref = {}
    if spec.residual:
        s = s + residual.to(s.device).double()
        ref["residual_out"] = s
    w = weight.to(s.device).double() + weight_offset
    norm = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w
    ref["norm"] = norm
    if spec.quant is Quant.NONE:
        ref["out"] = norm
    elif spec.quant is Quant.FP8_STATIC:
        ref["out"] = (norm / scale).clamp(-FP8_MAX, FP8_MAX)
    else:
        tokens, hidden = s.shape
        amax = norm.reshape(tokens, spec.groups(hidden), -1).abs().amax(dim=-1)
        floor = PER_TOKEN_MIN_SCALE if spec.quant is Quant.FP8_PER_TOKEN else GROUP_MIN_SCALE
        ref["scale_out"] = (amax / FP8_MAX).clamp_min(floor)
        ref["out"] = norm
    return ref


def decoded_scales(spec: FusionSpec, scale_out: torch.Tensor, hidden: int, device="cpu") -> torch.Tensor:
    """A call's dynamic scales as float64 (tokens, groups) on ``device``, UE8M0 ones decoded."""
    if spec.scale_layout is ScaleLayout.UE8M0:
        return unpack_ue8m0(scale_out.to(device), spec.groups(hidden)).double()
    return scale_out.detach().to(device).double()


def output_errors(spec: FusionSpec, case: Case, world_size: int, got: Dict[str, torch.Tensor],
                  ref: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Tuple[float, float]]:
    """``{output: (error, tolerance)}`` of a call's outputs against the float64 reference (``ref``: from
    :func:`reference_outputs`, computed here when not given).

    Quantized outputs are checked by their dequantized error (``quant * scale`` against the norm); dynamic scales
    by their formula: float32 scales by relative error, UE8M0 ones must be powers of two covering the group's
    ``amax / 448`` and less than twice it (each within the input dtype's tolerance)."""
    ref = reference_outputs(case, world_size, spec) if ref is None else ref
    tol, tol_q = TOLERANCE[case.dtype], TOLERANCE[torch.float8_e4m3fn]
    errors = {}
    if "residual_out" in got:
        errors["residual_out"] = (rel_err(got["residual_out"], ref["residual_out"]), tol)
    if "norm_out" in got:
        errors["norm_out"] = (rel_err(got["norm_out"], ref["norm"]), tol)
    if spec.quant in (Quant.NONE, Quant.FP8_STATIC):
        errors["out"] = (rel_err(got["out"].float(), ref["out"]), tol_q if spec.quant else tol)
        return errors
    scales = decoded_scales(spec, got["scale_out"], case.hidden, ref["out"].device)
    want = ref["scale_out"]
    if spec.scale_layout is ScaleLayout.UE8M0:
        power_of_two = torch.equal(torch.frexp(scales)[0], torch.full_like(scales, 0.5))
        over = (want / scales - 1).clamp_min(0).max().item()  # the scale must cover amax / 448 ...
        under = (scales / (2 * want) - 1).clamp_min(0).max().item()  # ... by less than a factor of two
        errors["scale_out"] = (max(over, under) if power_of_two else float("inf"), tol)
    else:
        errors["scale_out"] = (rel_err(scales.float(), want), tol)
    groups = scales.shape[1]
    dequant = got["out"].detach().to(scales.device).double() * scales.repeat_interleave(case.hidden // groups, dim=1)
    errors["out"] = (rel_err(dequant, ref["out"]), tol_q)
    return errors


def quant_arg(spec: FusionSpec, case: Case):
    """The ``quant=`` object of a quantizing spec."""
    if spec.quant is Quant.FP8_STATIC:
        return FP8Static(case.scale)
    if spec.quant is Quant.FP8_PER_TOKEN:
        return FP8PerToken()
    return FP8PerTokenGroup(spec.group_size, packed_ue8m0=spec.scale_layout is ScaleLayout.UE8M0)


def spec_inputs(spec: FusionSpec, case: Case, rank: int, device, x: Optional[torch.Tensor] = None
                ) -> Dict[str, Optional[torch.Tensor]]:
    """This rank's input tensors of ``case`` for ``spec`` (``x`` replaces the generated ``x``, e.g. a zero-copy
    buffer holding it)."""
    inputs = {"residual": case.residual(device) if spec.residual else None,
              "weight": case.weight(device) if spec.norm else None}
    if spec.moe:
        inputs.update(expert_out=case.expert_out(rank, device), permuted_idx=case.permuted_idx(rank, device),
                      expert_scales=case.expert_scales(rank, device),
                      shared_expert_out=case.shared_expert_out(rank, device) if spec.shared_expert else None)
    else:
        inputs["x"] = case.x(rank, device) if x is None else x
    return inputs


def run_spec(fusion, spec: FusionSpec, case: Case, inputs: Dict[str, Optional[torch.Tensor]],
             outputs: Dict[str, torch.Tensor], inplace: bool = False) -> Dict[str, torch.Tensor]:
    """Run ``spec`` on ``fusion`` through its public op with ``inputs`` (:func:`spec_inputs`) into ``outputs`` (as
    made by :func:`poisoned_outputs`); returns the written outputs by name. ``inplace``: the residual is updated in
    place (then ``outputs`` holds no ``residual_out`` and the residual tensor is returned as it)."""
    residual, weight = inputs["residual"], inputs["weight"]
    res_kw = {} if inplace else {"residual_out": outputs.get("residual_out")}
    offset = case.weight_offset if spec.weight_offset else 0.0
    if spec.moe:
        r = fusion.moe_finalize_residual_rmsnorm(
            inputs["expert_out"], inputs["permuted_idx"], inputs["expert_scales"], residual, weight, case.eps,
            weight_offset=offset, inplace=inplace, shared_expert_out=inputs["shared_expert_out"],
            quant=quant_arg(spec, case) if spec.quant else None, also_norm=spec.also_norm,
            quant_out=outputs["out"] if spec.quant else None, scale_out=outputs.get("scale_out"),
            norm_out=outputs.get("norm_out") if spec.quant else outputs["out"], **res_kw)
        got = {"out": r.quant if spec.quant else r.norm, "residual_out": r.residual, "norm_out": r.norm,
               "scale_out": r.scale}
        return {k: got[k] for k in operands.names(spec)}
    x = inputs["x"]
    if not spec.norm:
        return {"out": fusion.all_reduce(x, out=outputs["out"])}
    if not spec.residual:
        return {"out": fusion.rmsnorm(x, weight, case.eps, weight_offset=offset, out=outputs["out"])}
    if not spec.quant:
        norm, res = fusion.residual_rmsnorm(x, residual, weight, case.eps, weight_offset=offset,
                                            norm_out=outputs["out"], inplace=inplace, **res_kw)
        return {"out": norm, "residual_out": res}
    r = fusion.residual_rmsnorm_quant(x, residual, weight, case.eps, quant=quant_arg(spec, case),
                                      weight_offset=offset, also_norm=spec.also_norm, inplace=inplace,
                                      quant_out=outputs["out"], scale_out=outputs.get("scale_out"),
                                      norm_out=outputs.get("norm_out"), **res_kw)
    got = {"out": r.quant, "residual_out": r.residual, "norm_out": r.norm, "scale_out": r.scale}
    return {k: got[k] for k in operands.names(spec)}


def call_spec(fusion, spec: FusionSpec, case: Case, rank: int, device, outputs: Dict[str, torch.Tensor],
              x: Optional[torch.Tensor] = None, inplace: bool = False) -> Dict[str, torch.Tensor]:
    """:func:`run_spec` on this rank's fresh inputs of ``case``."""
    return run_spec(fusion, spec, case, spec_inputs(spec, case, rank, device, x), outputs, inplace)


def poisoned_outputs(spec: FusionSpec, case: Case, device) -> Dict[str, torch.Tensor]:
    """Every output ``spec`` writes, allocated as arfuse would and filled with NaN (int32 scales with -1), so an
    unwritten element fails the check."""
    made = operands.allocate_all(spec, case.tokens, case.hidden, case.dtype, device)
    for t in made.values():
        t.fill_(-1) if t.dtype == torch.int32 else poison(t)
    return made


@dataclass(frozen=True)
class SpecChecked:
    """One checked call of any spec: ``{output: (error, tolerance)}`` and the digest of this rank's outputs."""

    errors: Dict[str, Tuple[float, float]]
    digest: str
    failures: Tuple[str, ...] = field(default=())

    @property
    def within_tolerance(self) -> bool:
        return all(e <= t for e, t in self.errors.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {e:.2e}/{t:g}" for k, (e, t) in sorted(self.errors.items()))


def checked_spec_call(fusion, spec: FusionSpec, case: Case, rank: int, world_size: int, device,
                      inplace: bool = False) -> SpecChecked:
    """Run ``spec`` on this rank's inputs of ``case`` into NaN-poisoned outputs and compare every output with the
    float64 reference (:func:`output_errors`). Collective like the call itself."""
    outputs = poisoned_outputs(spec, case, device)
    if inplace:
        outputs.pop("residual_out", None)
    got = call_spec(fusion, spec, case, rank, device, outputs, inplace=inplace)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    errors = output_errors(spec, case, world_size, got)
    return SpecChecked(errors, digest(*(got[k] for k in operands.names(spec))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 on ``ref``'s device; inf if ``out`` has a NaN (e.g. an unwritten
    poisoned element)."""
    out = out.detach().to(ref.device, torch.float64)
    if torch.isnan(out).any():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the FP8 NaN) so unwritten elements are caught."""
    return t.fill_(float("nan"))


def digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and raw bytes: equal digests mean bitwise-identical outputs."""
    h = hashlib.sha256()
    for t in tensors:
        flat = torch.empty(t.numel(), dtype=t.dtype)  # fresh strides: a (1, 1) UE8M0 view has stride 4
        flat.copy_(t.detach().reshape(-1))
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def out_dtype(pattern: Pattern, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a classic ``pattern``'s main output for inputs of ``dtype``."""
    return operands.outputs(pattern.spec)[0].torch_dtype(dtype)


def call_pattern(fusion, pattern: Pattern, case: Case, x: torch.Tensor, residual: torch.Tensor,
                 weight: torch.Tensor, out: torch.Tensor, residual_out: Optional[torch.Tensor]):
    """Run ``pattern`` on ``fusion`` (an AllReduceFusion) into the given outputs; returns (out, residual_out)."""
    if pattern is Pattern.ALLREDUCE:
        return fusion.all_reduce(x, out=out), None
    if pattern is Pattern.RMSNORM:
        return fusion.rmsnorm(x, weight, case.eps, out=out), None
    if pattern is Pattern.RESIDUAL_RMSNORM:
        return fusion.residual_rmsnorm(x, residual, weight, case.eps, norm_out=out, residual_out=residual_out)
    return fusion.residual_rmsnorm_fp8(x, residual, weight, case.scale, case.eps, quant_out=out,
                                       residual_out=residual_out)


@dataclass(frozen=True)
class Checked:
    """One checked call: relative errors against the float64 reference, their tolerances, and the digest of this
    rank's outputs (equal digests on every rank: bitwise-identical results)."""

    err: float
    err_residual: float
    tol: float
    tol_residual: float
    digest: str

    @property
    def within_tolerance(self) -> bool:
        return self.err <= self.tol and self.err_residual <= self.tol_residual


def checked_call(fusion, pattern: Pattern, case: Case, rank: int, world_size: int, device,
                 x: Optional[torch.Tensor] = None) -> Checked:
    """Run ``pattern`` on this rank's inputs of ``case`` (or on ``x`` holding them, e.g. a zero-copy buffer) into
    NaN-poisoned outputs, then compare with the float64 reference. Collective like the call itself; comparing the
    digests across ranks is the caller's (it knows the group)."""
    x = case.x(rank, device) if x is None else x
    residual, weight = case.residual(device), case.weight(device)
    out = poison(torch.empty(case.tokens, case.hidden, dtype=out_dtype(pattern, case.dtype), device=device))
    res_out = poison(torch.empty_like(residual)) if pattern.has_residual else None
    out, res_out = call_pattern(fusion, pattern, case, x, residual, weight, out, res_out)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    ref, ref_res = reference(case, world_size, pattern)
    outputs = (out,) if res_out is None else (out, res_out)
    err_residual = rel_err(res_out, ref_res) if res_out is not None else 0.0
    return Checked(err=rel_err(out.float(), ref), err_residual=err_residual,
                   tol=TOLERANCE[out_dtype(pattern, case.dtype)], tol_residual=TOLERANCE[case.dtype],
                   digest=digest(*outputs))
