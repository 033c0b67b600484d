"""FlashInfer backend: FlashInfer's fused allreduce (+ residual + RMSNorm [+ FP8]) kernels (TensorRT-LLM's
Lamport one-shot and two-shot), driven through whichever API generation is installed.

Variants: ``auto`` (FlashInfer's own one-shot/two-shot heuristic, ``use_oneshot=None``), ``oneshot``,
``twoshot`` (calls with no more tokens than ranks run one-shot: FlashInfer's two-shot needs more).

Patterns: each spec maps to an ``AllReduceFusionPattern`` member through the table in
:mod:`arfuse.backends.flashinfer_patterns` (read against the probe: the member and every parameter it needs must
exist in the installed release, else the spec is refused with the reason). FlashInfer has no pattern without a
residual, so a spec without one runs with a zero residual held in the workspace (``x + 0`` is exact) and discards
the residual output into workspace scratch.

Where FlashInfer's semantics differ from arfuse's (:mod:`arfuse.core.math`), and how this backend handles it:

- rounding: FlashInfer adds the residual and writes the norm in the input dtype and quantizes that rounded norm;
  arfuse normalizes the fp32 sum and quantizes the fp32 norm. The difference is within the dtype's rounding (and
  far inside FP8's); :func:`arfuse.verify.checked_spec_call` tolerances cover it (issue 16 runs them).
- static FP8: FlashInfer's ``scale_factor`` is the dequantization scale (its kernel multiplies by
  ``1 / scale_factor`` and saturates to +-448), the same convention as arfuse's ``scale``
  (``clamp(norm / scale, -448, 448)``), so the scale tensor is passed unchanged.
- dynamic per-token FP8 (patterns 10/11): ``max(amax / 448, 1 / (512 * 448))`` per token into a float32
  (tokens, 1) ``scale_out``: arfuse's formula and layout, passed as they are.
- per-token-group FP8 (8/9): ``max(amax / 448, 1e-10)`` rounded up to a power of two, packed UE8M0 in an int32
  (tokens, ceil(G/4)) tensor of strides (1, tokens padded to 4): exactly ``arfuse.core.math.ue8m0_empty``.
  FlashInfer's unified API compares the strides as a tuple, so a caller's tensor whose size-1 dimension has
  another (irrelevant) stride is passed as a view with FlashInfer's strides over the same memory. FlashInfer has
  no fp32 group scales: that layout is refused.
- MoE finalize (7): FlashInfer's ``expanded_idx_to_permuted_idx[t * top_k + k]`` is arfuse's ``permuted_idx[t,
  k]`` (int32, row-major), passed as is once guarded; it reads ``expert_scale_factor`` in the input dtype, so fp32
  expert scales are rounded to it first, and it sums the weighted rows in the input dtype (arfuse: fp32) - within
  the dtype's rounding per expert. An index of -1 adds nothing in FlashInfer; any other index outside [0, P) it
  would read out of bounds, so every index outside [0, P) is replaced by -1 on the GPU before the call (one
  ``torch.where``, graph-safe) and recorded in the workspace's ``IndexGuard`` (arfuse's semantics: that row adds
  nothing, and ``check_health()`` reports it). MoE runs one-shot only; FP8 after MoE finalize is refused
  (FlashInfer runs it only on its mnnvl-cutedsl backend, which needs NVLink multicast).

Verification: what has run on GPUs, and on which code, is the verification record's (``backends/verification.py``;
FlashInfer needs 2+ GPUs, so only a run on real ranks can add to it).

Nothing here imports flashinfer at module import; the probe and the adapter import it when first used.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from arfuse.backends import flashinfer_adapter as adapter
from arfuse.backends import flashinfer_patterns as patterns
from arfuse.backends.base import Backend, IndexGuard, Support, Workspace, register
from arfuse.backends.flashinfer_workspace import MANAGER, NAME, WorkspaceManager
from arfuse.core.spec import FEATURES, FusionSpec, Quant, ScaleLayout
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Problem

SUPPORTED_SM_MAJORS = (9, 10)  # SM90 (H100/H200), SM100 (B200/GB200): the archs TRT-LLM's fusion kernels target
MAX_HIDDEN = 16384  # FlashInfer's kernels take it; hidden 4096 and 8192 were validated on 4x H200 (2026-11-28)

# Largest call (tokens * hidden * itemsize bytes) arfuse routes to FlashInfer, by (SM major, world size). These
# bound workspace memory (about 4 * world_size * bytes per rank), not speed: the tuned table decides speed.
# SM90 at 2 and 4 ranks: 32 MiB (2048 tokens x 8192 x bf16) is the largest size validated and timed on 4x H200
# (bench/results/2026-11-28_h200x4); 8 and 16 ranks and SM100 are FlashInfer's own limits scaled down, not
# measured here (no such machine was lent).
MAX_BYTES = {
    (9, 2): 32 << 20, (9, 4): 32 << 20, (9, 8): 32 << 20, (9, 16): 16 << 20,
    (10, 2): 64 << 20, (10, 4): 64 << 20, (10, 8): 32 << 20, (10, 16): 16 << 20,
}

# FlashInfer releases before this one size-check MoE finalize by the permuted expert rows P (expert_out.numel() *
# 2 * world_size against MAX_COMM_SIZE) instead of the token rows; arfuse checks the same before calling them.
MOE_ROWS_FIXED_IN = (0, 6, 15)


def max_bytes(sm, world_size: int) -> Optional[int]:
    return MAX_BYTES.get((sm[0] if sm else None, world_size))


def _release(version: Optional[str]) -> tuple:
    """The leading integers of a version string: (0, 6, 10) for "0.6.10.post1"; () for None."""
    parts = []
    for piece in (version or "").split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


class FlashInferWorkspace(Workspace):
    """One fusion object's use of a shared FlashInfer workspace, plus its zero residual, scratch rows and the
    routes (spec -> FlashInfer call) resolved so far."""

    def __init__(self, manager: WorkspaceManager, shared, capacity: Capacity, max_tokens: int, probe):
        super().__init__()
        self.manager, self.shared, self.handle = manager, shared, shared.handle
        shape = (max_tokens, capacity.hidden_size)
        self.scratch = torch.empty(shape, dtype=capacity.dtype, device=capacity.device)
        self.zeros = torch.zeros(shape, dtype=capacity.dtype, device=capacity.device)
        self.probe = probe
        self.routes: dict = {}  # spec code -> Route
        self.rows: dict = {}  # (buffer name, tokens) -> that buffer's first rows (a view made once)
        if capacity.device.type == "cuda":
            self.index_guard = IndexGuard(capacity.device)

    def route(self, spec: FusionSpec) -> patterns.Route:
        """The FlashInfer call for ``spec`` on this workspace's API path (checked by ``check``; cached)."""
        found = self.routes.get(spec.code)
        if found is None:
            found, why = patterns.route(spec, self.probe, self.handle.path)
            if found is None:
                raise RuntimeError(f"flashinfer: {spec.name} cannot run here: {why}")
            self.routes[spec.code] = found
        return found

    def first_rows(self, name: str, n: int) -> torch.Tensor:
        """``scratch[:n]`` or ``zeros[:n]`` (``name``), the view made on first use (a view per call costs ~1 µs)."""
        view = self.rows.get((name, n))
        if view is None:
            view = self.rows[(name, n)] = getattr(self, name)[:n]
        return view

    def _release(self) -> None:
        self.manager.release(self.shared)
        self.scratch = self.zeros = None
        self.rows = {}


class FlashInferBackend(Backend):
    """FlashInfer's fused kernels. Capable on CUDA SM90/SM100 groups of 2/4/8/16 ranks on one host with P2P."""

    name = NAME
    variants = ("auto", "oneshot", "twoshot")
    support = Support(devices=frozenset({"cuda"}),
                      dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
                      features=FEATURES, world_sizes=frozenset({2, 4, 8, 16}), max_hidden=MAX_HIDDEN)
    priority = 50
    # arfuse's side of the path (FlashInfer's kernels are its release's; the record names the release it ran)
    SOURCES = ("arfuse.backends.flashinfer", "arfuse.backends.flashinfer_adapter", "arfuse.backends.flashinfer_patterns",
               "arfuse.backends.flashinfer_workspace", "arfuse.probe.flashinfer_api")

    def verified_sources(self, variant: str):
        return self.SOURCES

    def __init__(self, manager: WorkspaceManager = MANAGER):
        self.manager = manager

    def free_idle(self) -> int:
        # closed fusion objects leave their workspace parked for reuse (see WorkspaceManager.release)
        return self.manager.destroy_parked()

    def check_group(self, caps: GroupCaps) -> Optional[str]:
        fi = caps.flashinfer
        if fi is None:
            return "flashinfer: not probed (only CUDA groups are)"
        if not fi.available:
            return f"flashinfer: {fi.reason}"
        if caps.sm is None or caps.sm[0] not in SUPPORTED_SM_MAJORS:
            arch = f"sm{caps.sm[0]}{caps.sm[1]}" if caps.sm else "unknown or mixed"
            return f"GPU arch {arch} not supported (needs SM90 or SM100)"
        if not caps.single_host:
            return caps.note("single_host")
        if not caps.p2p:
            return caps.note("p2p")
        return None

    def check_variant(self, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
        fi, spec = caps.flashinfer, problem.spec
        itemsize = torch.empty((), dtype=problem.dtype).element_size()
        if problem.hidden_size % (16 // itemsize):
            return f"hidden size {problem.hidden_size} is not a multiple of {16 // itemsize} (16 bytes)"
        paths = patterns.paths(fi)
        if problem.dtype == torch.float32 and not all(fi.flags(p)["fp32"] for p in paths):
            return f"flashinfer {fi.version}: no fp32 workspace"
        why = patterns.refusal(spec, fi, problem.dtype, problem.hidden_size)
        if why is not None:
            return why
        if spec.moe and variant == "twoshot":
            return "FlashInfer's MoE finalize runs one-shot only (no two-shot variant)"
        if spec.moe and problem.expert_rows:
            why = moe_row_reason(fi, problem.expert_rows, problem.hidden_size, problem.world_size)
            if why is not None:
                return why
        limit = max_bytes(caps.sm, problem.world_size)
        if limit is not None and problem.nbytes > limit:
            return f"{problem.nbytes} bytes per call exceeds the FlashInfer limit of {limit} for this GPU/world"
        lamport_item = 4 if problem.dtype == torch.float32 else 2
        if (variant == "oneshot" or spec.moe) and problem.world_size * problem.num_tokens * problem.hidden_size \
                * lamport_item > adapter.MAX_COMM_SIZE:
            return "one-shot Lamport buffer would exceed FlashInfer's 2 GiB limit"
        return None

    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> FlashInferWorkspace:
        """Acquire the group's shared workspace (collective over ``group``; not graph-safe)."""
        fi = caps.flashinfer
        row = capacity.hidden_size * capacity.itemsize
        limit = max_bytes(caps.sm, caps.world_size)
        tokens = capacity.max_tokens if limit is None else max(1, min(capacity.max_tokens, limit // row))
        shared = self.manager.acquire(group, dtype=capacity.dtype, device=capacity.device, max_tokens=tokens,
                                      hidden=capacity.hidden_size, probe=fi, strict=False)
        return FlashInferWorkspace(self.manager, shared, capacity, tokens, fi)

    def run(self, ws: FlashInferWorkspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        """One FlashInfer launch on the current stream. Collective; graph-capturable (no allocation for the
        non-MoE specs; the MoE index guard's few small temporaries come from the capturing graph's pool)."""
        route = ws.route(spec)
        fn, args, kwargs = (_moe_call if spec.moe else _fusion_call)(ws, variant, spec, call, route)
        try:
            fn(*args, **kwargs)
        except Exception:
            ws.shared.suspect = True  # the executor handles the error; the workspace is not reused after it
            raise


def _outputs(ws: FlashInferWorkspace, spec: FusionSpec, call: FusedCall) -> dict:
    """Where FlashInfer writes each output of ``spec``: arfuse's tensors, or workspace scratch for what arfuse
    does not return (the allreduced sum of a norm pattern, the residual of a spec without one)."""
    if not spec.norm:
        return dict(allreduce_out=call.out, residual_in=None, residual_out=None, norm_out=None, quant_out=None)
    n = call.num_tokens
    scratch = ws.first_rows("scratch", n)
    residual = dict(residual_in=call.residual, residual_out=call.residual_out) if spec.residual else \
        dict(residual_in=ws.first_rows("zeros", n), residual_out=scratch)
    norm_out = call.out if spec.quant is Quant.NONE else (call.norm_out if spec.also_norm else None)
    return dict(residual, allreduce_out=scratch, norm_out=norm_out,
                quant_out=call.out if spec.quant is not Quant.NONE else None)


def flashinfer_scales(scale_out: Optional[torch.Tensor], spec: FusionSpec) -> Optional[torch.Tensor]:
    """``scale_out`` as FlashInfer takes it: per-token fp32 scales as they are; packed UE8M0 scales with strides
    exactly ``(1, tokens padded to 4)`` (arfuse's layout; only the stride of a size-1 dimension may differ, and
    FlashInfer's unified API compares the tuple), the same tensor when they already are."""
    if scale_out is None or spec.scale_layout is not ScaleLayout.UE8M0:
        return scale_out
    expected = (1, -(-scale_out.shape[0] // 4) * 4)
    return scale_out if scale_out.stride() == expected else scale_out.as_strided(scale_out.shape, expected)


def _fusion_call(ws: FlashInferWorkspace, variant: str, spec: FusionSpec, call: FusedCall, route):
    n = call.num_tokens
    return adapter.fusion_call(
        ws.handle, pattern_code=route.code, oneshot=adapter.use_oneshot(variant, n, ws.handle), x=call.x,
        gamma=call.weight if spec.norm else None, eps=call.eps,
        scale=call.scale if spec.quant is Quant.FP8_STATIC else None,
        scale_out=flashinfer_scales(call.scale_out, spec) if spec.dynamic_scale else None,
        group_size=spec.group_size if spec.quant is Quant.FP8_PER_TOKEN_GROUP else None,
        weight_bias=call.weight_offset if spec.weight_offset else 0.0, **_outputs(ws, spec, call))


def guarded_indices(ws: FlashInferWorkspace, call: FusedCall) -> torch.Tensor:
    """``call.expert_idx`` with every index outside ``[0, P)`` replaced by -1 (FlashInfer skips -1 and would read
    out of bounds for the others), recorded in the workspace's index guard; CPU inputs were checked by validation
    and pass unchanged."""
    idx = call.expert_idx
    if ws.index_guard is None:
        return idx
    valid = (idx >= 0) & (idx < call.x.shape[0])
    ws.index_guard.record(~valid)
    return torch.where(valid, idx, -1)


def moe_row_reason(probe, rows: int, hidden: int, world: int) -> Optional[str]:
    """Why a release that size-checks MoE finalize by its permuted rows (before 0.6.15) would refuse ``rows``
    expert rows, or None."""
    if _release(probe.version) >= MOE_ROWS_FIXED_IN:
        return None
    if rows * hidden * 2 * world <= adapter.MAX_COMM_SIZE:
        return None
    return (f"flashinfer {probe.version}: MoE finalize with {rows} expert rows exceeds its one-shot limit "
            f"(it counts the permuted rows before 0.6.15)")


def _moe_call(ws: FlashInferWorkspace, variant: str, spec: FusionSpec, call: FusedCall, route):
    # the expert row limit of older releases was checked when the call was planned (check_variant, expert_rows)
    dtype = call.x.dtype
    scales = call.expert_scales if call.expert_scales.dtype == dtype else call.expert_scales.to(dtype)
    return adapter.moe_finalize_call(
        ws.handle, pattern_code=route.code, expert_out=call.x, permuted_idx=guarded_indices(ws, call),
        expert_scales=scales, shared=call.shared if spec.shared_expert else None, residual_in=call.residual,
        residual_out=call.residual_out, norm_out=call.out, gamma=call.weight, eps=call.eps,
        weight_bias=call.weight_offset if spec.weight_offset else 0.0)


register(FlashInferBackend())
