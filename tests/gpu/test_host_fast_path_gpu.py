"""The eager fast path on one GPU (``nccl`` at world size 1): each spec kind gives bitwise the outputs of the
checked path with Triton's own ``kernel[grid]`` launches, with fresh, caller and in-place outputs and inputs that
are not 16-byte aligned; every fast launch calls the very compiled kernel Triton's cache holds for those arguments
(checked with Triton's binder on every launch); CUDA graphs capture and replay fast launches and a float FP8
scale; a launch hook sends launches back through Triton. Sets ``ARFUSE_ALLOW_UNVERIFIED=1`` (the nccl path's new
features, as tests/gpu/test_patterns_gpu.py does)."""
from __future__ import annotations

import pytest
import torch

from arfuse import verify
from arfuse.backends.base import ALLOW_UNVERIFIED_ENV
from arfuse.core.spec import (ALLREDUCE, RESIDUAL_RMSNORM, RESIDUAL_RMSNORM_FP8, RMSNORM, FusionSpec, Prologue, Quant,
                              ScaleLayout)
from arfuse.kernels import _launch
from tests._calls import public_call, same_outputs

pytestmark = pytest.mark.gpu
HIDDEN = 8192  # arfuse bench --host's default on GPUs: the same compiled kernels
TOKENS = (1, 8, 37)
_GROUP = dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128)
_MOE = dict(prologue=Prologue.MOE_FINALIZE)
SPECS = (  # one of each kind (the full catalogue runs in test_patterns_gpu.py)
    RESIDUAL_RMSNORM, RMSNORM, ALLREDUCE, RESIDUAL_RMSNORM_FP8, FusionSpec(weight_offset=True),
    FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32, also_norm=True),
    FusionSpec(scale_layout=ScaleLayout.FP32, **_GROUP), FusionSpec(scale_layout=ScaleLayout.UE8M0, **_GROUP),
    FusionSpec(**_MOE), FusionSpec(shared_expert=True, scale_layout=ScaleLayout.UE8M0, **_MOE, **_GROUP),
)


@pytest.fixture(scope="module", autouse=True)
def allow_unverified():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ALLOW_UNVERIFIED_ENV, "1")
        yield


@pytest.fixture(scope="module")
def fusions():
    import arfuse

    made = {}
    for name in ("fast", "checked"):
        made[name] = arfuse.AllReduceFusion(max_tokens=64, hidden_size=HIDDEN, dtype=torch.bfloat16, device="cuda",
                                            backend="nccl", strict=True)
    made["checked"]._preparation.fast = False
    yield made
    for f in made.values():
        f.close()


@pytest.fixture
def checked_launches(monkeypatch):
    """Every fast launch is checked against Triton's own choice: the compiled kernel Triton's cache holds for these
    arguments (its binder and cache key, as ``JITFunction.run`` computes them) is the one launched."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    seen = {"fast": 0, "slow": 0}
    real = _launch.Launcher.launch

    def launch(self, grid, args, consts, options):
        kernel = getattr(self.module, self.name)
        device = torch.cuda.current_device()
        key = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, self.key(args),
               tuple(consts.values()), tuple(options.values()))
        entry = self.entries.get(key)
        if entry is not None:
            cache, key_cache, _, _, binder = kernel.device_caches[device]
            debug = kernel.debug or knobs.runtime.debug
            _, specialization, opts = binder(*args, **consts, **options, debug=debug,
                                             instrumentation_mode=knobs.compilation.instrumentation_mode)
            assert cache[compute_cache_key(key_cache, specialization, opts)] is entry.compiled, self.name
        seen["fast" if entry is not None else "slow"] += 1
        return real(self, grid, args, consts, options)

    monkeypatch.setattr(_launch.Launcher, "launch", launch)
    return seen


def _calls(fusions, spec, tokens, mode, seed, launch_fast):
    case = verify.Case(tokens, HIDDEN, torch.bfloat16, seed, weight_offset=1.0 if spec.weight_offset else 0.0)
    got = public_call(fusions["fast"], spec, case, mode, "cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_launch, "ENABLED", launch_fast)
        want = public_call(fusions["checked"], spec, case, mode, "cuda")
    torch.cuda.synchronize()
    return got, want


def test_every_spec_matches_the_checked_path_with_tritons_launches_bitwise(fusions, checked_launches):
    for n, spec in enumerate(SPECS):
        for tokens in TOKENS:
            for mode in ("fresh", "given") + (("inplace",) if spec.residual else ()):
                got, want = _calls(fusions, spec, tokens, mode, n, launch_fast=False)
                same_outputs(got, want, f"{spec.name} {mode} tokens={tokens}")
    assert checked_launches["fast"] > checked_launches["slow"] > 0
    assert fusions["fast"].stats()["calls"] == fusions["checked"].stats()["calls"]


def test_inputs_off_the_16_byte_grid_compile_their_own_kernel_and_match(fusions, checked_launches):
    flat = torch.randn(3 * 8 * HIDDEN + 1, device="cuda").to(torch.bfloat16)
    x = flat[1:1 + 8 * HIDDEN].view(8, HIDDEN)  # contiguous, 2 bytes past a 16-byte boundary
    residual = torch.randn(8, HIDDEN, device="cuda").to(torch.bfloat16)
    weight = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    before = checked_launches["slow"]
    for _ in range(3):
        got = fusions["fast"].residual_rmsnorm(x, residual, weight)
        with pytest.MonkeyPatch.context() as mp:  # Triton's own launch of the same (unaligned) arguments
            mp.setattr(_launch, "ENABLED", False)
            want = fusions["checked"].residual_rmsnorm(x, residual, weight)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert x.data_ptr() % 16 and checked_launches["fast"] >= 2  # compiled once for this alignment, then fast
    assert checked_launches["slow"] >= before


def test_cuda_graphs_capture_fast_launches_and_a_float_scale(fusions):
    fusion = fusions["fast"]
    x = torch.randn(8, HIDDEN, device="cuda").to(torch.bfloat16)
    residual = torch.randn(8, HIDDEN, device="cuda").to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(torch.bfloat16)

    def step():
        norm, res = fusion.residual_rmsnorm(x, residual, weight)
        quant, _ = fusion.residual_rmsnorm_fp8(x, residual, weight, 0.05)
        return norm, res, quant

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm: compiled kernels and the cached scale exist before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(8, HIDDEN, device="cuda", generator=g))
        graph.replay()
        want = fusions["checked"].residual_rmsnorm(x, residual, weight)
        want_q, _ = fusions["checked"].residual_rmsnorm_fp8(x, residual, weight, 0.05)
        torch.cuda.synchronize()
        assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1])
        assert torch.equal(outs[2].view(torch.uint8), want_q.view(torch.uint8))
    graph.reset()


def test_a_launch_hook_sees_every_launch(fusions):
    from triton import knobs

    fusion = fusions["fast"]
    x = torch.randn(4, HIDDEN, device="cuda").to(torch.bfloat16)
    residual, weight = torch.randn_like(x), torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    fusion.residual_rmsnorm(x, residual, weight)
    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    try:
        for _ in range(3):
            fusion.residual_rmsnorm(x, residual, weight)
    finally:
        knobs.runtime.launch_enter_hook.remove(hooked.append)
    torch.cuda.synchronize()
    assert len(hooked) == 3


def test_the_static_scale_cache_is_used_outside_capture_only(fusions):
    spec = FusionSpec(quant=Quant.FP8_STATIC)
    fast = fusions["fast"]._preparation
    before = dict(fast.scales)
    case = verify.Case(4, HIDDEN, torch.bfloat16, 1)
    public_call(fusions["fast"], spec, case, "fresh", "cuda")
    assert case.scale in fast.scales and fast.scales[case.scale][0].is_cuda
    assert set(before) <= set(fast.scales)
