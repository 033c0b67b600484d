"""The launch paths of the GPU backends timed on the CPU (``arfuse bench --host``, the stubbed table): each
backend's ``run`` for a few specs with Triton stubbed (:mod:`arfuse.bench.triton_stub`; nothing is launched) -
the host work from ``Backend.run`` to the compiled kernel's launcher - next to the same launches through
``kernel[grid]`` with their arguments prebuilt; the first way to time the ``triton_symm`` and ``flashinfer`` paths,
which cannot be constructed on one GPU."""
from __future__ import annotations

import types
from dataclasses import asdict
from typing import Dict, List

import torch

from arfuse.backends import base
from arfuse.bench.host_calls import prepared_call
from arfuse.bench.host_cases import Case, HostConfig, Inputs, cases
from arfuse.bench.host_profile import profile_call
from arfuse.bench.host_timing import summarize, time_rounds
from arfuse.bench.triton_stub import recorded_launches, triton_stubbed
from arfuse.core.spec import FusionSpec

class _StubSymmWorkspace:
    """The parts of a ``SymmWorkspace`` the ``triton_symm`` backend's ``run`` reads."""

    def __init__(self, args):
        self.args = args

    def raise_if_failed(self) -> None:
        return None

    def is_zero_copy(self, x) -> bool:
        return False


def symm_args(cfg: HostConfig, world: int = 4):
    from arfuse.kernels.launch_config import SymmArgs

    state = torch.zeros(64, dtype=torch.int32)
    ptrs = tuple(0x7F0000000000 + (r << 32) for r in range(world)) + (0,) * (8 - world)
    pads = tuple(0x7E0000000000 + (r << 32) for r in range(world)) + (0,) * (8 - world)
    slot = -(-cfg.tokens * cfg.hidden // 64) * 64
    return SymmArgs(peer_ptrs=ptrs, pad_ptrs=pads, err_ptr=0x10000, guard_ptr=0x20000, lamport_state=state[0:2],
                    one_shot_state=state[2:4], lts_state=state[4:6], barrier_gen=state[6:], rank=0, world_size=world,
                    timeout_ns=10 ** 10, max_grid=528, barrier_slots=288, sms=132, one_shot_off=0, one_shot_half=slot,
                    zero_copy_off=2 * slot, two_shot_off=3 * slot, two_shot_slot=slot, gather_off=8 * slot,
                    lamport_off=16 * slot, lamport_slot=slot, lamport_buffer=world * slot, lts_rs_off=32 * slot,
                    lts_rs_buffer=world * slot, lts_gather_off=48 * slot, lts_gather_buffer=slot)


def _stub_flashinfer_workspace(cfg: HostConfig, dtype, specs: Dict[FusionSpec, int], world: int = 4):
    """A FlashInfer workspace stand-in on the unified API whose fusion function is a no-op with FlashInfer
    0.7's parameter names, so ``FlashInferBackend.run`` builds its real argument list. ``specs``: spec -> the
    pattern code its route carries."""
    from arfuse.backends import flashinfer_adapter as adapter
    from arfuse.backends import flashinfer_patterns as patterns
    from arfuse.backends.flashinfer import FlashInferWorkspace
    from arfuse.probe import flashinfer_api as fi_api

    def allreduce_fusion(input, workspace, pattern, launch_with_pdl=False, output=None, residual_out=None,
                         norm_out=None, quant_out=None, scale_out=None, residual_in=None, rms_gamma=None,
                         rms_eps=1e-6, scale_factor=None, layout_code=None, use_oneshot=None,
                         trigger_completion_at_end=True, fp32_acc=False, block_quant_group_size=None,
                         weight_bias=0.0, expanded_idx_to_permuted_idx=None, expert_scale_factor=None,
                         shared_expert_output=None, moe_finalize_backend="trtllm"):
        return None

    info = fi_api.describe(fi_api.UNIFIED_FUSION, allreduce_fusion)
    handle = adapter.Handle(fi_api.UNIFIED, 0, world, 2048, cfg.hidden, dtype, None, info, allreduce_fusion,
                            {"use_oneshot_none": True}, workspace=object())
    ws = FlashInferWorkspace.__new__(FlashInferWorkspace)  # no shared FlashInfer workspace behind it
    base.Workspace.__init__(ws)
    ws.manager = ws.shared = None
    ws.handle, ws.index_guard = handle, None
    ws.probe = types.SimpleNamespace(version="0.7.4")  # a release that size-checks MoE by its token rows
    ws.scratch = torch.empty(max(cfg.tokens, 16), cfg.hidden, dtype=dtype)
    ws.zeros = torch.zeros_like(ws.scratch)
    ws.routes = {spec.code: patterns.Route(fi_api.UNIFIED_FUSION, patterns.member(spec), code)
                 for spec, code in specs.items()}
    ws.rows = {}
    return ws


STUB_SPECS = ("residual_rmsnorm", "residual_rmsnorm+fp8", "rmsnorm", "allreduce",
              "residual_rmsnorm+fp8_group128_ue8m0", "moe_finalize+residual_rmsnorm")


def stubbed_launchers(cfg: HostConfig) -> List[dict]:
    """µs per call of each GPU backend's ``run`` for a few specs on the CPU, nothing launched (see the module
    docstring and :func:`triton_stubbed`), next to ``bare``: the same kernel launches through ``kernel[grid]``
    with their arguments prebuilt (for FlashInfer: its function called with the arguments prebuilt). Not
    collective; needs Triton, no GPU."""
    from arfuse.backends.base import IndexGuard
    from arfuse.backends.flashinfer import FlashInferBackend
    from arfuse.backends.nccl import NcclNormBackend, NcclWorkspace
    from arfuse.backends.triton_symm import TritonSymmBackend

    dtype = getattr(torch, cfg.dtype)
    inp = Inputs(cfg, torch.device("cpu"))
    by_name: Dict[str, Case] = {}
    for c in cases(HostConfig(**{**asdict(cfg), "cases": ()})):
        if c.form == "object" and not (c.inplace or c.caller_outputs):
            by_name.setdefault(c.spec.name, c)
    specs = [by_name[s] for s in STUB_SPECS if s in by_name]
    guard = IndexGuard.__new__(IndexGuard)  # no pinned memory on a CPU-only torch
    guard.ptr = 0x30000
    nccl_ws = NcclWorkspace(None, 1, torch.empty(max(cfg.tokens, 16), cfg.hidden, dtype=dtype), guard)
    symm_ws = _StubSymmWorkspace(symm_args(cfg))
    fi_ws = _stub_flashinfer_workspace(cfg, dtype, {c.spec: k for k, c in enumerate(specs)})
    paths = [("nccl", "default", NcclNormBackend(), nccl_ws)]
    paths += [("triton_symm", v, TritonSymmBackend(), symm_ws)
              for v in ("lamport", "one_shot", "two_shot", "lamport_two_shot")]
    paths += [("flashinfer", "auto", FlashInferBackend(), fi_ws)]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(), triton_stubbed():
            _stub_rows(cfg, paths, specs, inp, rows)
    finally:
        torch.set_num_threads(threads)
    return rows


def _stub_rows(cfg: HostConfig, paths, specs, inp: Inputs, rows: list) -> None:
    from arfuse.backends.flashinfer import _fusion_call, _moe_call

    for backend, variant, impl, ws in paths:
        for case in specs:
            call = prepared_call(case, inp)

            def fn(impl=impl, ws=ws, variant=variant, spec=case.spec, call=call):
                impl.run(ws, variant, spec, call)

            fns = {"launcher": fn}
            try:
                if backend == "flashinfer":
                    spec = case.spec
                    f, a, kw = (_moe_call if spec.moe else _fusion_call)(ws, variant, spec, call, ws.route(spec))
                    fns["bare"] = lambda f=f, a=a, kw=kw: f(*a, **kw)
                else:
                    launches = recorded_launches(fn)

                    def bare(launches=launches):
                        for k, grid, a, kw in launches:
                            k[grid](*a, **kw)

                    fns["bare"] = bare
                samples = time_rounds(fns, cfg, torch.device("cpu"), None, 1)
            except Exception as e:  # noqa: BLE001 - a path the stub cannot drive is reported
                rows.append({"backend": backend, "variant": variant, "spec": case.spec.name,
                             "error": f"{type(e).__name__}: {e}"})
                continue
            row = {"backend": backend, "variant": variant, "spec": case.spec.name, "timing": summarize(samples)}
            if cfg.profile:
                row["profile_us"] = profile_call(fn, cfg.calls, torch.device("cpu"))
            rows.append(row)
