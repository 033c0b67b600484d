"""Float64 oracle and reproducible per-rank inputs, shared by the demo, the benchmark, the tuner and the tests.

Every rank can rebuild every other rank's input from the seed, so the float64 reference needs no communication.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from arfuse.core.types import FP8_MAX, Pattern

# Worst relative error (||out - ref|| / ||ref||) accepted per output dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float8_e4m3fn: 7e-2}


@dataclass(frozen=True)
class Case:
    """One call's inputs: ``x`` per rank (fresh random each), shared ``residual`` and ``weight``."""

    tokens: int
    hidden: int
    dtype: torch.dtype
    seed: int
    eps: float = 1e-6
    scale: float = 0.05

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def x(self, rank: int, device="cpu") -> torch.Tensor:
        g = self._gen(17 + rank)
        return torch.randn(self.tokens, self.hidden, generator=g).to(self.dtype).to(device)

    def residual(self, device="cpu") -> torch.Tensor:
        return torch.randn(self.tokens, self.hidden, generator=self._gen(1)).to(self.dtype).to(device)

    def weight(self, device="cpu") -> torch.Tensor:
        w = 1.0 + 0.1 * torch.randn(self.hidden, generator=self._gen(2))
        return w.to(self.dtype).to(device)


def reference(case: Case, world_size: int, pattern: Pattern) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, residual_out) in float64 for ``pattern`` (out before FP8 rounding for the FP8 pattern)."""
    s = sum(case.x(r).double() for r in range(world_size))
    if pattern is Pattern.ALLREDUCE:
        return s, None
    res_out = None
    if pattern.has_residual:
        s = s + case.residual().double()
        res_out = s
    norm = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + case.eps) * case.weight().double()
    if pattern is Pattern.RESIDUAL_RMSNORM_FP8:
        norm = (norm / case.scale).clamp(-FP8_MAX, FP8_MAX)
    return norm, res_out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf if ``out`` has a NaN (e.g. an unwritten poisoned element)."""
    out = out.detach().to("cpu", torch.float64)
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
        flat = t.detach().contiguous().cpu().reshape(-1)
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def out_dtype(pattern: Pattern, dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``pattern``'s main output for inputs of ``dtype``."""
    return torch.float8_e4m3fn if pattern is Pattern.RESIDUAL_RMSNORM_FP8 else dtype


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
