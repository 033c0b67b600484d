"""The launchers' fast path (``arfuse.kernels._launch``), on the CPU: each kernel's key covers every parameter
(by kind, as Triton specializes it); launches that share a key share Triton's own specialization (its binder,
for sm_90, over every spec kind, dtype, token count, alignment and workspace); a fast launch passes the compiled
kernel's launcher exactly what ``JITFunction.run`` passes it; and every condition that must send a launch back
through ``kernel[grid]`` does (a launch hook, a replaced kernel, another device, ``TRITON_DEBUG``, a new key).
Triton runs as on a GPU up to the compiled launcher, which launches nothing (``arfuse.bench.triton_stub``'s stand-ins)."""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from arfuse.bench import host_cases, host_stubbed, triton_stub  # noqa: E402
from arfuse.core.spec import FusionSpec, catalogue  # noqa: E402
from arfuse.kernels import _launch  # noqa: E402
from arfuse.kernels import nccl_epilogue as ne  # noqa: E402
from arfuse.verify import Case  # noqa: E402
from tests._calls import fused_call  # noqa: E402

VARIANTS = ("lamport", "one_shot", "two_shot", "lamport_two_shot")
MODULES = {name: importlib.import_module(f"arfuse.kernels.{name}") for name in (*VARIANTS, "nccl_epilogue")}
LAUNCHERS = {launcher.name: launcher for launcher in _launch.LAUNCHERS}
HIDDEN = 256


def _kernel(name):
    return next(getattr(m, name) for m in MODULES.values() if hasattr(m, name))


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_every_kernel_parameter_has_one_kind_in_its_key(name):
    kernel, key = _kernel(name), LAUNCHERS[name].key
    tensors, fixed, runtime = key.positions
    floats = [i for i, p in enumerate(kernel.params) if p.name in _launch.FLOATS]
    keyed = sorted(tensors + fixed + runtime + tuple(floats))
    assert keyed == [i for i, p in enumerate(kernel.params) if not p.is_constexpr], name
    assert len(set(keyed)) == len(keyed)
    assert {i for i, p in enumerate(kernel.params) if p.do_not_specialize} == set(runtime) | set(floats)
    assert all(not kernel.params[i].do_not_specialize for i in tensors + fixed)


# -- every launch the launchers make, over specs, dtypes, sizes, alignments and workspaces ----------------------
def _misaligned(t):
    """The same values, 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype)
    view = flat[1:1 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _calls():
    specs = catalogue()
    for spec, dtype, tokens in itertools.product(specs, (torch.bfloat16, torch.float32, torch.float16), (1, 3, 17)):
        case = Case(tokens, HIDDEN, dtype, seed=tokens, weight_offset=1.0 if spec.weight_offset else 0.0)
        call, _ = fused_call(spec, case)
        yield spec, call
        if tokens == 3 and dtype == torch.bfloat16:  # misaligned inputs and outputs; fp32 MoE scales as dtype
            call.x, call.out = _misaligned(call.x), _misaligned(call.out)
            if call.residual is not None:
                call.residual = _misaligned(call.residual)
            if call.expert_scales is not None:
                call.expert_scales = call.expert_scales.to(dtype)
            yield spec, call


def _workspaces():
    cfg = host_cases.HostConfig(hidden=HIDDEN, tokens=17)
    for world in (2, 4):
        a = host_stubbed.symm_args(cfg, world)
        yield a
    a = host_stubbed.symm_args(cfg, 8)
    a.guard_ptr, a.timeout_ns, a.lamport_off = 1, 2 ** 31 + 16, 8  # values Triton specializes differently
    yield a


def _recorded():
    """(kernel name, grid, args, kwargs) of every launch."""
    for spec, call in _calls():
        launches = []
        if spec.norm:
            summed = torch.empty(call.num_tokens, HIDDEN, dtype=call.x.dtype)
            for guard in ((0x2000, 0x2008, 1) if spec.moe else (0,)):
                launches += triton_stub.recorded_launches(lambda: ne.moe_finalize(call, spec, guard, summed)) \
                    if spec.moe else []
            launches += triton_stub.recorded_launches(lambda: ne.rmsnorm_epilogue(summed, call, spec))
        for a in _workspaces():
            for variant in VARIANTS:
                module = MODULES[variant]
                extra = {"copy_in": True} if variant == "one_shot" else {}
                launches += triton_stub.recorded_launches(lambda: getattr(module, variant)(a, call, spec, **extra))
            if not spec.moe:
                launches += triton_stub.recorded_launches(lambda: MODULES["one_shot"].one_shot(a, call, spec, copy_in=False))
        for kernel, grid, args, kwargs in launches:
            yield kernel.fn.__name__, grid, args, kwargs


@pytest.fixture(scope="module")
def launches():
    return list(_recorded())


def test_the_launchers_pass_each_position_the_kind_its_key_reads(launches):
    for name, _, args, kwargs in launches:
        tensors, fixed, runtime = LAUNCHERS[name].key.positions
        assert all(args[i] is None or isinstance(args[i], torch.Tensor) for i in tensors), name
        assert all(type(args[i]) is int for i in fixed + runtime), name
        assert list(kwargs) == [*_kernel(name).arg_names[len(args):], *[k for k in kwargs if k in
                                                                         ("num_warps", "enable_fp_fusion")]]


def test_launches_that_share_a_key_share_tritons_specialization(launches):
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders = {name: create_function_from_signature(_kernel(name).signature, _kernel(name).params, backend)
               for name in LAUNCHERS}
    seen, kinds = {}, set()
    for name, _, args, kwargs in launches:
        launcher = LAUNCHERS[name]
        consts = {k: v for k, v in kwargs.items() if k in _kernel(name).arg_names}
        options = {k: v for k, v in kwargs.items() if k not in consts}
        ours = (name, launcher.key(args), tuple(consts.values()), tuple(options.values()))
        _, specialization, opts = binders[name](*args, **kwargs, debug=False, instrumentation_mode="")
        theirs = (tuple(specialization), str(opts))
        assert seen.setdefault(ours, theirs) == theirs, (name, ours)
        kinds.add(theirs)
    assert len(kinds) > 100  # the sweep reached many specializations (spec kinds, dtypes, alignments, ...)


# -- the fast launch itself, through Triton's real JITFunction.run on stand-ins ------------------------------
class _Seen:
    def __init__(self):
        self.calls = []

    def __call__(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.calls.append(((grid_x, grid_y, grid_z, stream), (launch_metadata, enter, exit_), args))


@pytest.fixture
def stubbed(monkeypatch):
    seen = _Seen()
    monkeypatch.setattr(triton_stub._StubLauncher, "__call__", lambda self, *a: seen(*a))
    with triton_stub.triton_stubbed():
        yield seen


def _epilogue_call(spec=FusionSpec(), tokens=5, dtype=torch.bfloat16):
    call, _ = fused_call(spec, Case(tokens, HIDDEN, dtype, seed=tokens))
    return torch.randn(tokens, HIDDEN, dtype=dtype), call, spec


def _runs(kernel, monkeypatch):
    """Count ``kernel[grid]`` launches (Triton's own path)."""
    count = [0]
    real = kernel.run

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counted, raising=False)
    return count


def test_a_fast_launch_passes_what_jitfunction_run_passes(stubbed, monkeypatch):
    slow = _runs(ne.rmsnorm_epilogue_kernel, monkeypatch)
    summed, call, spec = _epilogue_call()
    ne.rmsnorm_epilogue(summed, call, spec)
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 1 and len(stubbed.calls) == 2
    (grid_a, hooks_a, args_a), (grid_b, hooks_b, args_b) = stubbed.calls
    assert grid_a == grid_b and len(args_a) == len(args_b) == len(ne.rmsnorm_epilogue_kernel.arg_names)
    assert all(a is b or a == b for a, b in zip(args_a, args_b))
    assert hooks_b == (None, None, None)  # no hook set: no launch metadata, no hook calls


def test_fresh_tensors_of_the_same_kind_reuse_the_compiled_kernel_and_a_new_kind_compiles(stubbed, monkeypatch):
    slow = _runs(ne.rmsnorm_epilogue_kernel, monkeypatch)
    for tokens in (5, 9, 5):  # fresh tensors each call, token counts are runtime arguments
        ne.rmsnorm_epilogue(*_epilogue_call(tokens=tokens))
    assert slow[0] == 1
    ne.rmsnorm_epilogue(*_epilogue_call(dtype=torch.float16))  # another dtype: another specialization
    summed, call, spec = _epilogue_call()
    call.out = _misaligned(call.out)  # a pointer that is not 16-byte aligned: another specialization
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 3
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 3 and stubbed.calls[-1][2][3] is call.out


def test_a_launch_hook_a_replaced_kernel_another_device_or_debug_take_tritons_path(stubbed, monkeypatch):
    slow = _runs(ne.rmsnorm_epilogue_kernel, monkeypatch)
    summed, call, spec = _epilogue_call()
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 1
    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    try:
        ne.rmsnorm_epilogue(summed, call, spec)
    finally:
        knobs.runtime.launch_enter_hook.remove(hooked.append)
    assert slow[0] == 2 and stubbed.calls[-1][1][1] is knobs.runtime.launch_enter_hook
    monkeypatch.setattr(knobs.runtime, "debug", True)
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 3
    monkeypatch.setattr(knobs.runtime, "debug", False)
    from triton.runtime.driver import driver

    monkeypatch.setattr(driver.active, "get_current_device", lambda: 1)
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 4
    monkeypatch.setattr(driver.active, "get_current_device", lambda: 0)
    ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 4  # back on device 0: fast again
    recorded = triton_stub.recorded_launches(lambda: ne.rmsnorm_epilogue(summed, call, spec))
    assert len(recorded) == 1  # a replaced kernel (a test's recorder) sees every launch


def test_fast_launch_off_sends_every_launch_through_kernel_grid(stubbed, monkeypatch):
    monkeypatch.setattr(_launch, "ENABLED", False)
    slow = _runs(ne.rmsnorm_epilogue_kernel, monkeypatch)
    summed, call, spec = _epilogue_call()
    for _ in range(3):
        ne.rmsnorm_epilogue(summed, call, spec)
    assert slow[0] == 3 and not LAUNCHERS["rmsnorm_epilogue_kernel"].entries


def test_a_compiled_kernel_of_another_shape_is_never_cached(stubbed, monkeypatch):
    class Odd:
        arg_names = ne.rmsnorm_epilogue_kernel.arg_names
        debug = None
        pre_run_hooks = []

        def __getitem__(self, grid):
            return lambda *a, **k: object()  # no run/function/packed_metadata

    summed, call, spec = _epilogue_call()
    ne.rmsnorm_epilogue(summed, call, spec)
    assert LAUNCHERS["rmsnorm_epilogue_kernel"].entries  # the stand-in compiled kernel has a launcher's shape
    _launch.clear_all()
    monkeypatch.setattr(ne, "rmsnorm_epilogue_kernel", Odd())
    ne.rmsnorm_epilogue(summed, call, spec)
    assert not LAUNCHERS["rmsnorm_epilogue_kernel"].entries
