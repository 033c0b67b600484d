"""FlashInfer backend: FlashInfer's fused allreduce (+ residual + RMSNorm [+ FP8]) kernels (TensorRT-LLM's
Lamport one-shot and two-shot), driven through whichever API generation is installed.

Variants: ``auto`` (FlashInfer's own one-shot/two-shot heuristic, ``use_oneshot=None``), ``oneshot``,
``twoshot`` (calls with no more tokens than ranks run one-shot: FlashInfer's two-shot needs more).

Patterns: ALLREDUCE -> ``kAllReduce``; RESIDUAL_RMSNORM -> ``kARResidualRMSNorm``; RESIDUAL_RMSNORM_FP8 ->
``kARResidualRMSNormFP8Quant``. FlashInfer has no allreduce + RMSNorm pattern without a residual, so RMSNORM runs
``kARResidualRMSNorm`` with a zero residual held in the workspace (``x + 0`` is exact) and discards the residual
output into workspace scratch. FP8: FlashInfer's ``scale_factor`` is the dequantization scale (its kernel
multiplies by ``1 / scale_factor`` and saturates to +-448), the same convention as arfuse's ``scale``
(``clamp(norm / scale, -448, 448)``), so the scale tensor is passed unchanged.

Nothing here imports flashinfer at module import; the probe and the adapter import it when first used.
"""
from __future__ import annotations

from typing import Optional

import torch

from arfuse.backends import flashinfer_adapter as adapter
from arfuse.backends.base import Backend, Support, Workspace, register
from arfuse.backends.flashinfer_workspace import MANAGER, NAME, PATTERN_MEMBERS, WorkspaceManager
from arfuse.core.spec import FusionSpec, Quant
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Pattern, Problem

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


def max_bytes(sm, world_size: int) -> Optional[int]:
    return MAX_BYTES.get((sm[0] if sm else None, world_size))


class FlashInferWorkspace(Workspace):
    """One fusion object's use of a shared FlashInfer workspace, plus its zero residual and scratch rows."""

    def __init__(self, manager: WorkspaceManager, shared, capacity: Capacity, max_tokens: int, codes: dict):
        super().__init__()
        self.manager, self.shared, self.handle = manager, shared, shared.handle
        shape = (max_tokens, capacity.hidden_size)
        self.scratch = torch.empty(shape, dtype=capacity.dtype, device=capacity.device)
        self.zeros = torch.zeros(shape, dtype=capacity.dtype, device=capacity.device)
        self.codes = codes

    def _release(self) -> None:
        self.manager.release(self.shared)
        self.scratch = self.zeros = None


class FlashInferBackend(Backend):
    """FlashInfer's fused kernels. Capable on CUDA SM90/SM100 groups of 2/4/8/16 ranks on one host with P2P."""

    name = NAME
    variants = ("auto", "oneshot", "twoshot")
    support = Support(devices=frozenset({"cuda"}),
                      dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
                      world_sizes=frozenset({2, 4, 8, 16}), max_hidden=MAX_HIDDEN)
    priority = 50

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
        fi = caps.flashinfer
        itemsize = torch.empty((), dtype=problem.dtype).element_size()
        if problem.hidden_size % (16 // itemsize):
            return f"hidden size {problem.hidden_size} is not a multiple of {16 // itemsize} (16 bytes)"
        paths = {fi.path_for(False), fi.path_for(True)} - {None}
        if problem.dtype == torch.float32 and not all(fi.flags(p)["fp32"] for p in paths):
            return f"flashinfer {fi.version}: no fp32 workspace"
        if problem.spec.quant is Quant.FP8_STATIC and not all(fi.flags(p)["fp8_scale_tensor"]
                                                                       for p in paths):
            return f"flashinfer {fi.version}: FP8 scale must be a host float (not graph-safe)"
        member = PATTERN_MEMBERS[classic_name(problem.spec)]
        if member not in fi.patterns:
            return f"flashinfer {fi.version}: no {member} pattern"
        limit = max_bytes(caps.sm, problem.world_size)
        if limit is not None and problem.nbytes > limit:
            return f"{problem.nbytes} bytes per call exceeds the FlashInfer limit of {limit} for this GPU/world"
        lamport_item = 4 if problem.dtype == torch.float32 else 2
        if variant == "oneshot" and problem.world_size * problem.num_tokens * problem.hidden_size * lamport_item \
                > adapter.MAX_COMM_SIZE:
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
        codes = {p: fi.patterns[PATTERN_MEMBERS[p.name]] for p in Pattern if PATTERN_MEMBERS[p.name] in fi.patterns}
        return FlashInferWorkspace(self.manager, shared, capacity, tokens, codes)

    def run(self, ws: FlashInferWorkspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        """One FlashInfer launch on the current stream. Collective; graph-capturable (no allocation)."""
        n, x, out = call.num_tokens, call.x, call.out
        scratch = ws.scratch[:n]
        pattern = Pattern[classic_name(spec)]
        if pattern is Pattern.ALLREDUCE:
            outs = dict(allreduce_out=out, residual_in=None, residual_out=None, norm_out=None, quant_out=None)
        elif pattern is Pattern.RMSNORM:
            outs = dict(allreduce_out=scratch, residual_in=ws.zeros[:n], residual_out=scratch, norm_out=out,
                        quant_out=None)
        elif pattern is Pattern.RESIDUAL_RMSNORM:
            outs = dict(allreduce_out=scratch, residual_in=call.residual, residual_out=call.residual_out,
                        norm_out=out, quant_out=None)
        else:
            outs = dict(allreduce_out=scratch, residual_in=call.residual, residual_out=call.residual_out,
                        norm_out=None, quant_out=out)
        fn, args, kwargs = adapter.fusion_call(
            ws.handle, pattern_code=ws.codes[pattern], oneshot=adapter.use_oneshot(variant, n, ws.handle), x=x,
            gamma=call.weight if spec.norm else None, eps=call.eps,
            scale=call.scale if spec.quant else None, **outs)
        try:
            fn(*args, **kwargs)
        except Exception:
            ws.shared.suspect = True  # the executor handles the error; the workspace is not reused after it
            raise


def classic_name(spec: FusionSpec) -> str:
    """The classic pattern name (a ``PATTERN_MEMBERS`` key) of a spec with the classic features only."""
    if not spec.norm:
        return "ALLREDUCE"
    if not spec.residual:
        return "RMSNORM"
    return "RESIDUAL_RMSNORM_FP8" if spec.quant else "RESIDUAL_RMSNORM"


register(FlashInferBackend())
