"""The checks the ``triton_symm`` kernels must pass on virtual ranks (:mod:`arfuse.testing.virtual_ranks`), each one
a function returning a JSON-ready record with ``ok`` and, when not ok, ``problem``:

- :func:`check_point`: one call of a spec on every rank, fresh random inputs per rank, outputs poisoned with NaN,
  every output against the float64 reference (:mod:`arfuse.verify`), bitwise identical across ranks, no rank
  recording a timeout; modes ``plain``, ``inplace`` (the residual updated in place), ``zero_copy`` (the one-shot
  kernel reading its input from the workspace) and ``bad_index`` (the last rank's MoE indices hold one index past
  the expert rows in a late slot, pointing at a NaN row: its guard alone is set and the row adds nothing);
- :func:`check_timeout`: one rank skips the call; every other rank records a timeout naming it, within the bound;
- :func:`check_graph`: every rank's launch captured in one CUDA graph, replayed with fresh inputs, every replay
  checked.

:func:`matrix` lists the points of the verification run and :func:`precompile` compiles their kernels in worker
processes first (Triton's on-disk cache then serves the checking process).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from arfuse import verify
from arfuse.backends.triton_symm import max_bytes
from arfuse.core.spec import RESIDUAL_RMSNORM, FusionSpec, catalogue
from arfuse.core.types import FusedCall
from arfuse.kernels.launch_config import kernel_group_size_reason
from arfuse.testing.calls import fused_call
from arfuse.testing.virtual_ranks import VirtualRanks

VARIANTS = ("lamport", "one_shot", "two_shot", "lamport_two_shot")
MODES = ("plain", "inplace", "zero_copy", "bad_index")
MOE_TOP_K = 8


@dataclass(frozen=True)
class Point:
    """One checked call: ``spec`` through ``variant`` on ``world`` ranks, ``tokens`` x ``hidden`` in ``dtype``."""

    variant: str
    spec: FusionSpec
    world: int
    hidden: int
    tokens: int
    dtype: torch.dtype
    mode: str = "plain"

    def describe(self) -> dict:
        return dict(variant=self.variant, spec=self.spec.name, features=sorted(self.spec.features), world=self.world,
                    hidden=self.hidden, tokens=self.tokens, dtype=str(self.dtype).replace("torch.", ""),
                    mode=self.mode)


def runs(variant: str, spec: FusionSpec, tokens: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether ``variant`` takes the call at all (its size limit; group sizes the kernels reshape by)."""
    nbytes = tokens * hidden * torch.empty((), dtype=dtype).element_size()
    return nbytes <= max_bytes(variant) and kernel_group_size_reason(spec) is None


def case_of(point: Point, seed: int, device) -> verify.Case:
    """The inputs of ``point``: Gemma-style weights for offset specs, top_k 8 for the MoE prologue."""
    return verify.Case(point.tokens, point.hidden, point.dtype, seed=seed,
                       weight_offset=1.0 if point.spec.weight_offset else 0.0,
                       top_k=MOE_TOP_K if point.spec.moe else 2, on=torch.device(device).type)


def bad_index(case: verify.Case, rank: int) -> torch.Tensor:
    """``rank``'s MoE indices with one index past the expert rows, in a late slot of the middle token."""
    idx = case.permuted_idx(rank, case.on).clone()
    idx[case.tokens // 2, case.top_k - 2] = case.rows
    return idx


def build_calls(vr: VirtualRanks, point: Point, case: verify.Case
                ) -> Tuple[List[FusedCall], List[Dict[str, torch.Tensor]], Dict[int, torch.Tensor]]:
    """Every rank's call of ``point`` (outputs poisoned), their outputs by name, and the ranks' replaced indices."""
    calls, outputs, replaced = [], [], {}
    last = point.world - 1
    for r in range(point.world):
        idx = bad_index(case, r) if point.mode == "bad_index" and r == last else None
        call, outs = fused_call(point.spec, case, vr.device, rank=r, inplace=point.mode == "inplace", idx=idx)
        if idx is not None:  # the row the bad index points at exists and is NaN: reading it would show
            padded = torch.cat([call.x, torch.full_like(call.x[:1], float("nan"))])
            call.x = padded[:case.rows]
            replaced[r] = idx
        if point.mode == "zero_copy":
            buffer = vr.input_buffer(r, point.variant, point.tokens)
            buffer.copy_(call.x)
            call.x = buffer
        calls.append(call)
        outputs.append(outs)
    return calls, outputs, replaced


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def compare(point: Point, case: verify.Case, outputs: Sequence[Dict[str, torch.Tensor]],
            ref: Dict[str, torch.Tensor]) -> Tuple[Dict[str, List[float]], bool]:
    """({output: [worst error over ranks, tolerance]}, whether every rank's outputs equal rank 0's bit for bit)."""
    worst: Dict[str, List[float]] = {}
    for outs in outputs:
        for name, (err, tol) in verify.output_errors(point.spec, case, point.world, outs, ref).items():
            seen = worst.setdefault(name, [0.0, tol])
            seen[0] = max(seen[0], err)
    identical = all(_same_bytes(outs[k], outputs[0][k]) for outs in outputs[1:] for k in outs)
    return worst, identical


def check_point(vr: VirtualRanks, point: Point, seed: int) -> dict:
    """Run ``point`` on ``vr`` (built for its world size, hidden and dtype) and check it (see the module docstring)."""
    case = case_of(point, seed, vr.device)
    calls, outputs, replaced = build_calls(vr, point, case)
    vr.clear_index_guards()
    vr.run(point.variant, point.spec, calls)
    failures, guards = vr.failures(), vr.index_errors()
    ref = verify.reference_outputs(case, point.world, point.spec, rank_idx=replaced)
    errors, identical = compare(point, case, outputs, ref)
    problems = [f"rank {r}: {f}" for r, f in enumerate(failures) if f]
    problems += [f"{name} error {e:.3g} > {t:g}" for name, (e, t) in errors.items() if not e <= t]
    if not identical:
        problems.append("outputs differ across ranks")
    guarded = [r for r, g in enumerate(guards) if g]
    if guarded != sorted(replaced):
        problems.append(f"index guard set on ranks {guarded}, expected {sorted(replaced)}")
    return dict(point.describe(), errors=errors, identical=identical, ok=not problems,
                problem="; ".join(problems) or None)


def check_timeout(world: int, variant: str, hidden: int, dtype: torch.dtype, device, timeout_s: float = 1.0,
                  skipped: int = 1, slack_s: float = 2.0, tokens: int = 16) -> dict:
    """One rank (``skipped``) does not take part in a residual + RMSNorm call of ``tokens`` rows: every other rank must
    record a timeout naming it, within ``timeout_s + slack_s`` of the launch, and nothing may hang. (With fewer
    rows than ranks, a two-shot rank that owns no rows names the chunk owner it waited for.) Uses (and closes)
    its own virtual ranks: a timed-out workspace cannot be used again."""
    vr = VirtualRanks(world, tokens, hidden, dtype, device, timeout_s=timeout_s)
    try:
        point = Point(variant, RESIDUAL_RMSNORM, world, hidden, tokens, dtype)
        calls, _, _ = build_calls(vr, point, case_of(point, 0, vr.device))
        vr.compile(variant, point.spec, calls)
        start = time.perf_counter()
        vr.run(variant, point.spec, calls, skip={skipped})
        failures = vr.failures()
        elapsed = time.perf_counter() - start
    finally:
        vr.close()
    problems = []
    for r, message in enumerate(failures):
        if r == skipped:
            continue
        if message is None or f"for rank {skipped} " not in message:
            problems.append(f"rank {r}: {message or 'no timeout recorded'}")
    bound = timeout_s + slack_s
    if elapsed > bound:
        problems.append(f"took {elapsed:.2f} s, bound {bound:g} s")
    return dict(check="timeout", variant=variant, world=world, hidden=hidden, dtype=str(dtype).replace("torch.", ""),
                skipped=skipped, elapsed_s=round(elapsed, 3), timeout_s=timeout_s, ok=not problems,
                problem="; ".join(problems) or None)


def check_graph(world: int, variant: str, spec: FusionSpec, hidden: int, tokens: int, dtype: torch.dtype, device,
                replays: int = 1000, seed: int = 0) -> dict:
    """Capture every rank's launch of one in-place call in one CUDA graph (fork/join streams), then replay it
    ``replays`` times, each with fresh random inputs written into the captured tensors and NaN-poisoned outputs,
    checking every replay against the float64 reference and across ranks."""
    point = Point(variant, spec, world, hidden, tokens, dtype, mode="inplace")
    vr = VirtualRanks(world, tokens, hidden, dtype, device)
    try:
        case = case_of(point, seed, vr.device)
        calls, outputs, _ = build_calls(vr, point, case)
        vr.run(variant, spec, calls)  # warm up: every rank's kernel compiled and run once before the capture
        vr.raise_if_failed()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(vr.device)
        stream.wait_stream(torch.cuda.current_stream(vr.device))
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            vr.run(variant, spec, calls)
        torch.cuda.current_stream(vr.device).wait_stream(stream)
        gens = [torch.Generator(vr.device).manual_seed(seed * 101 + r) for r in range(world + 1)]
        fresh_residual = torch.empty_like(calls[0].residual)
        worst, bad = 0.0, []
        for replay in range(replays):
            for r, call in enumerate(calls):
                call.x.normal_(generator=gens[r])
            fresh_residual.normal_(generator=gens[world])
            for call, outs in zip(calls, outputs):
                call.residual.copy_(fresh_residual)
                for name, t in outs.items():
                    if t is not call.residual:
                        t.fill_(-1) if t.dtype == torch.int32 else verify.poison(t)
            graph.replay()
            total = sum(call.x.double() for call in calls)
            ref = verify.reference_from_sum(spec, total, fresh_residual, calls[0].weight, case.eps,
                                            case.weight_offset if spec.weight_offset else 0.0, case.scale)
            errors, identical = compare(point, case, outputs, ref)
            worst = max([worst] + [e for e, _ in errors.values()])
            if not identical or any(not e <= t for e, t in errors.values()):
                bad.append(replay)
        failures = vr.failures()
    finally:
        vr.close()
    problems = [f"rank {r}: {f}" for r, f in enumerate(failures) if f]
    if bad:
        problems.append(f"{len(bad)} of {replays} replays wrong (first: {bad[0]})")
    return dict(check="graph", variant=variant, spec=spec.name, world=world, hidden=hidden, tokens=tokens,
                dtype=str(dtype).replace("torch.", ""), replays=replays, worst_error=worst, ok=not problems,
                problem="; ".join(problems) or None)


def matrix(worlds: Iterable[int], hiddens: Iterable[int], tokens: Iterable[int],
           specs: Optional[Sequence[FusionSpec]] = None, dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
           variants: Sequence[str] = VARIANTS, modes: bool = True) -> List[Point]:
    """Every (spec, variant, world, hidden, tokens, dtype) point each variant takes (``specs``: the catalogue's by
    default), in plain mode; with ``modes``, per (variant, world, hidden, dtype) also one in-place call, one
    zero-copy call (one-shot) and one bad MoE index (a MoE spec), at the smallest token count above 1."""
    specs = catalogue() if specs is None else specs
    tokens = sorted(tokens)
    points = []
    for world in worlds:
        for hidden in hiddens:
            for dtype in dtypes:
                for variant in variants:
                    taken = [n for n in tokens if runs(variant, specs[0], n, hidden, dtype)]
                    for spec in specs:
                        points += [Point(variant, spec, world, hidden, n, dtype) for n in taken
                                   if runs(variant, spec, n, hidden, dtype)]
                    if modes and taken:
                        n = next((t for t in taken if t > 1), taken[0])
                        points += _mode_points(variant, specs, world, hidden, n, dtype)
    return points


def _mode_points(variant: str, specs: Sequence[FusionSpec], world: int, hidden: int, n: int,
                 dtype: torch.dtype) -> List[Point]:
    residual = next((s for s in specs if s.residual and not s.moe and not s.quant), None)
    moe = next((s for s in specs if s.moe), None)
    found = []
    if residual is not None:
        found.append(Point(variant, residual, world, hidden, n, dtype, mode="inplace"))
        if variant == "one_shot":
            found.append(Point(variant, residual, world, hidden, n, dtype, mode="zero_copy"))
    if moe is not None:
        found.append(Point(variant, moe, world, hidden, n, dtype, mode="bad_index"))
    return found
