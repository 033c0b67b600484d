"""The calls ``arfuse bench --host`` times per case: the public call (``arfuse``), the anchor aten op, the bare
work of the backend with every argument prepared (``bare``, and on the ``nccl`` path ``bare_direct``: its
compiled kernels straight through their launchers) and the unfused torch a user would write (``unfused``)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist

import arfuse
from arfuse import functional as F
from arfuse.backends import base
from arfuse.bench.host_cases import Case, Inputs
from arfuse.core import math as fmath, operands
from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
from arfuse.core.types import FP8_DTYPE, FP8_MAX, FusedCall


def arfuse_call(case: Case, fusion, inp: Inputs, group, backend: str) -> Callable[[], object]:
    """The public call of ``case`` (what a user writes), as a no-argument function."""
    x, res, w, eps, spec = inp.x, inp.residual, inp.weight, inp.eps, case.spec
    if case.form == "functional":
        if not spec.norm:
            return lambda: F.all_reduce(x, group=group, backend=backend)
        if not spec.residual:
            return lambda: F.rmsnorm(x, w, eps, group=group, backend=backend)
        return lambda: F.residual_rmsnorm(x, res, w, eps, group=group, backend=backend)
    if case.form == "module":
        module = arfuse.FusedAddRMSNorm(x.shape[1], eps, fusion=fusion)
        with torch.no_grad():
            module.weight.copy_(w)
        module.weight.requires_grad_(False)  # inference: no autograd graph around the call
        return lambda: module(x, res)
    if case.form == "op":
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        op = torch.ops.arfuse.fused_
        handle = fusion._handle  # the integer the traced graph carries
        return lambda: op(x, res, w, None, None, None, None, eps, 0.0, handle, spec.code, out, res_out, None, None)
    if spec.moe:
        return lambda: fusion.moe_finalize_residual_rmsnorm(inp.expert_out, inp.idx, inp.escales, res, w, eps)
    if not spec.norm:
        return lambda: fusion.all_reduce(x)
    if not spec.residual:
        return lambda: fusion.rmsnorm(x, w, eps)
    if spec.quant is Quant.FP8_STATIC:
        return lambda: fusion.residual_rmsnorm_fp8(x, res, w, inp.scale, eps)
    if spec.quant is not Quant.NONE:
        return lambda: fusion.residual_rmsnorm_quant(x, res, w, eps, quant=case.quant)
    if case.inplace:
        own = res.clone()  # updated by every call: not the residual the other cases read
        return lambda: fusion.residual_rmsnorm(x, own, w, eps, inplace=True)
    if case.caller_outputs:
        norm_out, res_out = torch.empty_like(x), torch.empty_like(x)
        return lambda: fusion.residual_rmsnorm(x, res, w, eps, norm_out=norm_out, residual_out=res_out)
    return lambda: fusion.residual_rmsnorm(x, res, w, eps)


def anchor_call(inp: Inputs) -> Callable[[], object]:
    """The anchor: one aten op of the same size, ``F.rms_norm`` of the (tokens, hidden) input (issue 23's targets
    are multiples of it)."""
    x, w, eps = inp.x, inp.weight, inp.eps
    shape = (x.shape[1],)
    return lambda: torch.nn.functional.rms_norm(x, shape, w, eps)


def prepared_call(case: Case, inp: Inputs) -> FusedCall:
    """The validated call arfuse's checks build for ``case``, with its outputs allocated once."""
    spec, n, h = case.spec, inp.x.shape[0], inp.x.shape[1]
    made = operands.allocate_all(spec, n, h, inp.dtype, inp.device)
    moe = dict(expert_idx=inp.idx, expert_scales=inp.escales) if spec.moe else {}
    x = inp.expert_out if spec.moe else inp.x
    residual = (inp.residual.clone() if case.inplace else inp.residual) if spec.residual else None
    return FusedCall(x, made["out"], residual=residual,
                     weight=inp.weight if spec.norm else None, eps=inp.eps,
                     scale=inp.scale_t if spec.quant is Quant.FP8_STATIC else None,
                     residual_out=residual if case.inplace else made.get("residual_out"),
                     norm_out=made.get("norm_out"), scale_out=made.get("scale_out"), **moe)


def unfused_call(case: Case, inp: Inputs, group, world: int) -> Callable[[], object]:
    """The torch a user writes without arfuse: clone + ``dist.all_reduce`` + an HF-style RMSNorm (weight times
    the normed input rounded to its dtype) and, for the FP8 kinds, the quantization."""
    spec, x, res, w, eps, dtype = case.spec, inp.x, inp.residual, inp.weight, inp.eps, inp.dtype

    def reduce(t):
        s = t.clone()
        if world > 1:
            dist.all_reduce(s, group=group)
        return s

    def moe_input():
        return (inp.expert_out[inp.idx.long()].float() * inp.escales.unsqueeze(-1)).sum(dim=1).to(dtype)

    def norm(s):
        h = s.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)

    def quantize(y):
        if spec.quant is Quant.FP8_STATIC:
            return (y.float() / inp.scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        if spec.quant is Quant.FP8_PER_TOKEN:
            scales = (y.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(fmath.PER_TOKEN_MIN_SCALE)
            return (y.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales
        scales = fmath.dynamic_scales(spec, y)
        q = (y.float() / fmath.expand_scales(scales, y.shape[1])).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, (fmath.pack_ue8m0(scales) if spec.scale_layout is ScaleLayout.UE8M0 else scales)

    def run():
        s = reduce(moe_input() if spec.moe else x)
        if not spec.norm:
            return s
        if spec.residual:
            s = s + res
        y = norm(s)
        return quantize(y) if spec.quant is not Quant.NONE else y

    return run


def bare_calls(case: Case, backend_name: str, fusion, inp: Inputs, group) -> Tuple[Dict[str, Callable], list]:
    """What the backend itself does for ``case`` with every argument prepared (see the module docstring), and
    the workspaces made for it (to close)."""
    backend = base.get(backend_name)
    ws = backend.prepare(fusion.capacity, fusion.caps, group)
    call = prepared_call(case, inp)
    spec = case.spec
    found = {"bare": lambda: backend.run(ws, "default", spec, call)}
    if backend_name == "nccl" and fusion.caps.world_size == 1:
        found = nccl_bare_launches(spec, call, ws)
    return found, [ws]


def nccl_bare_launches(spec: FusionSpec, call: FusedCall, ws) -> Dict[str, Callable]:
    """The ``nccl`` path's launches at world size 1 for ``call``, arguments prebuilt: through Triton's
    ``kernel[grid](...)`` (``bare``) and straight through the compiled kernels' launchers (``bare_direct``)."""
    from arfuse.kernels import launch_config as lc, nccl_launch as nl
    from arfuse.kernels import nccl_epilogue as ne

    x, n, hidden = call.x, call.num_tokens, call.x.shape[1]
    launches = []
    if not spec.norm:
        out = call.out
        return {"bare": lambda: out.copy_(x)}
    summed = x
    if spec.moe:
        summed = call.out if call.out.dtype == x.dtype else ws.scratch[:n]
        moe = nl.moe_launch(hidden, n, summed.dtype, summed.get_device())
        launches.append((ne.moe_finalize_kernel, nl.moe_grid(n, hidden, moe),
                         (x, *lc.prologue_args(call, ws.index_guard.ptr), summed, n),
                         dict(H=hidden, BLOCK_H=moe.block_h, SLOTS=moe.slots, EPI=spec.code,
                              num_warps=moe.num_warps)))
    launch = nl.epilogue_launch(hidden, n, summed.dtype, summed.get_device())
    launches.append((ne.rmsnorm_epilogue_kernel, nl.epilogue_grid(n, launch),
                     (summed, *lc.epilogue_args(call, spec), n),
                     dict(H=hidden, BLOCK_H=launch.block_h, ROWS=launch.rows, EVICT_FIRST=launch.evict_first,
                          EPI=spec.code, num_warps=launch.num_warps)))

    def bare():
        for kernel, grid, args, kwargs in launches:
            kernel[(grid,)](*args, **kwargs)

    direct = []
    for kernel, grid, args, kwargs in launches:
        compiled = kernel[(grid,)](*args, **kwargs)
        full = tuple(args) + tuple(kwargs[name] for name in kernel.arg_names[len(args):])
        direct.append((compiled.run, grid, compiled.function, compiled.packed_metadata, full))
    device = x.device.index
    stream_of = torch._C._cuda_getCurrentRawStream

    def bare_direct():
        stream = stream_of(device)
        for run, grid, function, meta, full in direct:
            run(grid, 1, 1, stream, function, meta, None, None, None, *full)

    return {"bare": bare, "bare_direct": bare_direct}
