"""``triton_symm``: arfuse's own fused kernels (Triton over torch symmetric memory), four variants:

- ``lamport``: barrier-free one-shot push (smallest sizes, up to ``LAMPORT_MAX_BYTES`` per call);
- ``one_shot``: every rank reads every peer, one barrier (up to ``ONE_SHOT_MAX_BYTES``; zero-copy input);
- ``two_shot``: token-partitioned push reduce-scatter + all-gather, two barriers;
- ``lamport_two_shot``: the same data flow with no barrier: every wait polls sentinel-filled local memory, so
  each row's epilogue overlaps the traffic of the others (two-shot sizes up to ``TWO_SHOT_MAX_BYTES``).

Needs only torch + Triton on CUDA, one host with working P2P among all ranks (checked for real at prepare).
All waits on peers are bounded by ``Capacity.timeout_s``; a timeout is recorded on the device and raised as
:class:`PeerTimeoutError` by the next call or ``check_health()``.

Every variant runs every spec: the same epilogue (``kernels/_epilogue``), and the MoE finalize prologue fused into
the read of this rank's rows (the push or copy-in; each row is built once), an index outside ``[0, P)`` recorded
in the workspace's IndexGuard. What is verified, and on which code, is the verification record's
(``backends/verification.py``); the rest needs ``ARFUSE_ALLOW_UNVERIFIED=1``.
"""
from __future__ import annotations

from typing import Optional

import torch

from arfuse.backends.base import ALL_FEATURES, Backend, Support, register
from arfuse.backends.symm_workspace import SymmWorkspace, tokens_within
from arfuse.core.spec import FusionSpec, Quant
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Problem
from arfuse.probe.device import symm_mem_reason
from arfuse.probe.facts import FactSource, LocalFacts, contribute, triton_facts

NAME = "triton_symm"
LAMPORT_MAX_BYTES = 2 << 20  # per call; Lamport pushes (world-1)x the tensor and keeps 2 x world copies
ONE_SHOT_MAX_BYTES = 64 << 20  # per call; beyond this two-shot moves half the bytes
TWO_SHOT_MAX_BYTES = 64 << 20  # per call; bounds the workspace (NCCL takes larger calls)
MIN_SM = (8, 0)  # system-scope acquire/release atomics and 16-byte vector loads


class TritonSymmBackend(Backend):
    name = NAME
    # Static preference (when no table decides): barrier-free first, the one-shot pull last.
    variants = ("lamport", "lamport_two_shot", "two_shot", "one_shot")
    support = Support(devices=frozenset({"cuda"}),
                      dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
                      world_sizes=frozenset(range(2, 9)), hidden_multiple=8, max_hidden=16384,
                      features=ALL_FEATURES)
    priority = 10

    def verified_sources(self, variant: str):
        return (f"arfuse.kernels.{variant}", "arfuse.backends.symm_workspace")

    def check_group(self, caps: GroupCaps) -> Optional[str]:
        if not caps.single_host:
            return f"ranks are not on one host ({caps.note('single_host')})"
        if not caps.p2p:
            return f"no P2P access between all ranks ({caps.note('p2p')})"
        if not caps.fact("symm_mem"):
            return f"torch symmetric memory unavailable ({caps.note('symm_mem')})"
        if not caps.fact("triton"):
            return f"Triton unusable ({caps.note('triton')})"
        if caps.sm is None or tuple(caps.sm) < MIN_SM:
            return f"needs compute capability >= {MIN_SM[0]}.{MIN_SM[1]}, group has {caps.sm}"
        return None

    def check_variant(self, problem: Problem, caps: GroupCaps, variant: str) -> Optional[str]:
        from arfuse.kernels.launch_config import kernel_group_size_reason

        if variant == "lamport_two_shot" and problem.spec.quant is not Quant.NONE:
            # Measured 2026-11-28 (4x H200): right values, but 2 of 32 FP8 cases differed in a few bits between
            # ranks. Cause found in the compiled code (the owner's rows were reduced over another thread split);
            # the fix (taken by every quantization) is compiled and checked on CPU (test_kernels_compile.py) but
            # not yet run on a GPU.
            return "lamport_two_shot: FP8 output not yet verified bitwise identical across ranks (bench/NOTES.md)"
        reason = kernel_group_size_reason(problem.spec)
        if reason:
            return reason
        limit = max_bytes(variant)
        if problem.nbytes > limit:
            return f"{variant} is limited to {limit} bytes per call, got {problem.nbytes}"
        return None

    def prepare(self, capacity: Capacity, caps: GroupCaps, group) -> SymmWorkspace:
        return SymmWorkspace.rendezvous(capacity, group, caps.rank, caps.world_size,
                                        one_shot_tokens=tokens_within(capacity, ONE_SHOT_MAX_BYTES),
                                        lamport_tokens=tokens_within(capacity, LAMPORT_MAX_BYTES),
                                        two_shot_tokens=tokens_within(capacity, TWO_SHOT_MAX_BYTES))

    def run(self, ws: SymmWorkspace, variant: str, spec: FusionSpec, call: FusedCall) -> None:
        ws.raise_if_failed()
        module = (_modules or _import_launchers())[variant]
        if variant == "one_shot":
            module.one_shot(ws.args, call, spec, copy_in=spec.moe or not ws.is_zero_copy(call.x))
        else:
            getattr(module, variant)(ws.args, call, spec)


def max_bytes(variant: str) -> int:
    """The most bytes (tokens * hidden * itemsize) one call of ``variant`` takes."""
    return {"lamport": LAMPORT_MAX_BYTES, "one_shot": ONE_SHOT_MAX_BYTES}.get(variant, TWO_SHOT_MAX_BYTES)


_modules: dict = {}  # variant -> its kernel module (named like its launcher), imported on first use: the modules
#                      need Triton, and an import per call costs ~1 µs


def _import_launchers() -> dict:
    import importlib

    for variant in TritonSymmBackend.variants:
        _modules[variant] = importlib.import_module(f"arfuse.kernels.{variant}")
    return _modules


def local_facts(device: torch.device) -> LocalFacts:
    """What this backend needs of each rank: ``symm_mem`` (torch symmetric memory usable) and ``triton``."""
    found = triton_facts(device)
    if device.type != "cuda":
        return LocalFacts({"symm_mem": False, **found.values})
    why = symm_mem_reason()
    return LocalFacts({"symm_mem": why is None, **found.values}, ((why,) if why else ()) + found.notes)


register(TritonSymmBackend())
contribute(FactSource(NAME, local_facts, names=("symm_mem", "triton")))
