"""The symmetric-memory workspace's host side, executed on CPU: torch's symmetric memory and the CUDA calls are
replaced by CPU stand-ins, so the setup code that otherwise only runs on a GPU (allocation, votes, rendezvous,
sentinel fill, launch arguments, the P2P read-back check, error reporting, release) runs in CI. One gloo rank."""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from arfuse.backends import symm_workspace as sw
from arfuse.backends.triton_symm import LAMPORT_MAX_BYTES, ONE_SHOT_MAX_BYTES, TWO_SHOT_MAX_BYTES
from arfuse.core.errors import BackendError, PeerTimeoutError
from arfuse.core.spec import (ALLREDUCE, RESIDUAL_RMSNORM, RESIDUAL_RMSNORM_FP8, FusionSpec, Prologue, Quant,
                              ScaleLayout)
from arfuse.core.types import Capacity
from arfuse.kernels.launch_config import SymmArgs
from arfuse.verify import Case
from tests._calls import fused_call

HIDDEN, TOKENS = 256, 32


class FakeHandle:
    """What ``rendezvous`` returns, for one rank: its own buffer as every 'peer' buffer."""

    def __init__(self, buffer, corrupt=False):
        self.buffer, self.corrupt = buffer, corrupt
        self.buffer_ptrs = [buffer.data_ptr()]
        self.signal_pad_ptrs = [0x1000]

    def get_buffer(self, peer, shape, dtype, offset):
        view = self.buffer[offset:offset + 8].view(shape)
        return torch.zeros_like(view) if self.corrupt else view


@pytest.fixture
def group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield None
    dist.destroy_process_group()


@pytest.fixture
def fake_cuda(monkeypatch):
    import torch.distributed._symmetric_memory as symm_mem

    made = {}

    def empty(n, dtype, device):
        made["buffer"] = torch.empty(n, dtype=dtype)
        return made["buffer"]

    def rendezvous(buffer, group):
        made["handle"] = FakeHandle(buffer, corrupt=made.get("corrupt", False))
        return made["handle"]

    real_zeros = torch.zeros
    monkeypatch.setattr(symm_mem, "empty", empty)
    monkeypatch.setattr(symm_mem, "rendezvous", rendezvous)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: real_zeros(*a, **k))  # no pinned memory
    return made


def _workspace(world=1, rank=0):
    cap = Capacity(TOKENS, HIDDEN, torch.bfloat16, torch.device("cpu"))
    return sw.SymmWorkspace.rendezvous(cap, None, rank, world, one_shot_tokens=sw.tokens_within(cap, ONE_SHOT_MAX_BYTES),
                                       lamport_tokens=sw.tokens_within(cap, LAMPORT_MAX_BYTES),
                                       two_shot_tokens=sw.tokens_within(cap, TWO_SHOT_MAX_BYTES))


def test_setup_builds_every_launch_argument_and_fills_the_sentinel(group, fake_cuda):
    ws = _workspace()
    a = ws.args
    assert isinstance(a, SymmArgs) and all(hasattr(a, f) for f in SymmArgs.__slots__)
    assert a.peer_ptrs[0] == fake_cuda["buffer"].data_ptr() and a.peer_ptrs[1:] == (0,) * 7
    assert a.sms == 132 and a.world_size == 1 and a.rank == 0 and a.timeout_ns > 0
    lay = sw.layout(HIDDEN, 1, TOKENS, TOKENS, TOKENS)
    assert a.lamport_off == lay.offsets["lamport"] and a.lamport_buffer == lay.lamport_slot
    tail = fake_cuda["buffer"][lay.offsets["lamport"]:].view(torch.int16)
    assert bool((tail == -32768).all())  # every barrier-free buffer starts as "not yet written" (-0.0)
    zc = ws.input_buffer("one_shot", 4)
    assert zc.shape == (4, HIDDEN) and ws.is_zero_copy(zc) and not ws.is_zero_copy(torch.empty(4, HIDDEN))
    assert ws.input_buffer("lamport", 4) is None and ws.input_buffer("one_shot", TOKENS + 1) is None
    ws.raise_if_failed()  # nothing recorded
    ws._release()
    assert ws.args is None and ws.buffer is None


def test_a_kernel_timeout_record_becomes_peer_timeout_error_naming_op_and_rank(group, fake_cuda):
    ws = _workspace()
    ws.err.copy_(torch.tensor([1, 4, 1, 0], dtype=torch.int32))  # what record_error writes: flag, op, peer, rank
    with pytest.raises(PeerTimeoutError, match=r"lamport two-shot kernel on rank 0 waited .* for rank 1"):
        ws.raise_if_failed()
    with pytest.raises(PeerTimeoutError):  # and stays failed
        ws.raise_if_failed()


def test_wrong_peer_reads_fail_the_setup_on_every_rank(group, fake_cuda):
    fake_cuda["corrupt"] = True
    with pytest.raises(BackendError, match="P2P access does not work: rank 0: reads wrong data from rank 0"):
        _workspace()


def test_allocation_failure_is_voted_before_the_rendezvous(group, fake_cuda, monkeypatch):
    import torch.distributed._symmetric_memory as symm_mem

    def out_of_memory(n, dtype, device):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(symm_mem, "empty", out_of_memory)
    with pytest.raises(BackendError, match="allocation failed on rank 0: OutOfMemoryError"):
        _workspace()
    assert "handle" not in fake_cuda  # no rendezvous was entered


# -- the launchers: every kernel argument passed, by position or name, and a sane grid --------------------------
LAUNCH_OPTIONS = {"num_warps", "num_stages", "enable_fp_fusion"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded, not launched."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def _check_launch(recorder):
    (grid, args, kwargs), = recorder.launches
    names = recorder.kernel.arg_names
    constexprs = {p.name for p in recorder.kernel.params if p.is_constexpr}
    assert len(args) + len(set(kwargs) - LAUNCH_OPTIONS) == len(names), (len(args), sorted(kwargs), names)
    assert set(kwargs) - LAUNCH_OPTIONS == set(names[len(args):]) == constexprs
    assert isinstance(grid, tuple) and all(isinstance(g, int) and g >= 1 for g in grid)
    return grid, dict(zip(names, args)), kwargs


LAUNCH_SPECS = [RESIDUAL_RMSNORM, ALLREDUCE, RESIDUAL_RMSNORM_FP8,
                FusionSpec(weight_offset=True, also_norm=True, quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
                FusionSpec(residual=False, quant=Quant.FP8_PER_TOKEN_GROUP, group_size=64,
                           scale_layout=ScaleLayout.UE8M0),
                FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True, quant=Quant.FP8_PER_TOKEN_GROUP,
                           group_size=128, scale_layout=ScaleLayout.FP32)]


def _check_call_arguments(named, kwargs, call, spec, guard_ptr):
    """The prologue and epilogue arguments a launcher passed are the call's own (and nothing else's)."""
    assert named["x_ptr"] is call.x and kwargs["EPI"] == spec.code and named["n_rows"] == call.num_tokens
    for name, want in (("res_ptr", call.residual), ("w_ptr", call.weight), ("out_ptr", call.out),
                       ("res_out_ptr", call.residual_out), ("norm_ptr", call.norm_out),
                       ("scale_ptr", call.scale), ("scale_out_ptr", call.scale_out)):
        assert named[name] is want, name
    assert named["eps"] == call.eps and named["weight_offset"] == (call.weight_offset if spec.weight_offset else 0)
    strides = call.scale_out.stride() if call.scale_out is not None else (0, 0)
    assert (named["scale_row_stride"], named["scale_col_stride"]) == strides
    if spec.scale_layout is ScaleLayout.UE8M0:
        assert strides == (1, -(-call.num_tokens // 4) * 4)  # column-major, token stride padded to 4
    if "idx_ptr" not in named:
        return
    if spec.moe:
        assert named["idx_ptr"] is call.expert_idx and named["esc_ptr"] is call.expert_scales
        assert named["shared_ptr"] is call.shared and named["guard_ptr"] == guard_ptr != 0
        assert (named["n_expert_rows"], named["top_k"]) == (call.x.shape[0], call.expert_idx.shape[1])
    else:
        assert named["idx_ptr"] is None and named["esc_ptr"] is None and named["shared_ptr"] is None


@pytest.mark.triton  # the launchers' modules define @triton.jit kernels at import
@pytest.mark.parametrize("spec", LAUNCH_SPECS, ids=str)
@pytest.mark.parametrize("tokens", [1, 4, 17, TOKENS])
@pytest.mark.parametrize("variant", ["lamport", "one_shot", "two_shot", "lamport_two_shot"])
def test_every_launcher_passes_each_kernel_argument_once(group, fake_cuda, monkeypatch, variant, tokens, spec):
    import importlib

    module = importlib.import_module(f"arfuse.kernels.{variant}")
    recorder = Recorder(getattr(module, f"{variant}_kernel"))
    monkeypatch.setattr(module, f"{variant}_kernel", recorder)
    ws = _workspace()
    assert ws.args.guard_ptr == ws.index_guard.ptr != 0
    call, _ = fused_call(spec, Case(tokens, HIDDEN, torch.bfloat16, seed=tokens, weight_offset=1.0))
    extra = {"copy_in": True} if variant == "one_shot" else {}
    getattr(module, variant)(ws.args, call, spec, **extra)
    grid, named, kwargs = _check_launch(recorder)
    _check_call_arguments(named, kwargs, call, spec, ws.args.guard_ptr)
    assert kwargs["RANK"] == 0 and kwargs["H"] == HIDDEN
    if variant == "lamport":
        assert grid[0] >= tokens and HIDDEN // kwargs["SPLIT"] >= 1 and grid[0] <= max(tokens, ws.args.sms)


@pytest.mark.triton
def test_one_shot_launcher_refuses_zero_copy_moe(group, fake_cuda):
    from arfuse.kernels.one_shot import one_shot

    spec = FusionSpec(prologue=Prologue.MOE_FINALIZE)
    call, _ = fused_call(spec, Case(4, HIDDEN, torch.bfloat16, seed=0))
    with pytest.raises(ValueError, match="copy_in must be True"):
        one_shot(_workspace().args, call, spec, copy_in=False)


@pytest.mark.triton
@pytest.mark.parametrize("spec", LAUNCH_SPECS[:1] + LAUNCH_SPECS[2:], ids=str)
@pytest.mark.parametrize("override", [None, (4, 8, 0), (2, 4, 16)])
def test_nccl_path_launchers_pass_each_kernel_argument_once(monkeypatch, spec, override):
    from arfuse.kernels import launch_config, nccl_launch
    from arfuse.kernels import nccl_epilogue as module

    monkeypatch.setattr(nccl_launch, "EPILOGUE_OVERRIDE", override)
    call, _ = fused_call(spec, Case(5, HIDDEN, torch.bfloat16, seed=1, weight_offset=1.0))
    summed = torch.randn(5, HIDDEN, dtype=torch.bfloat16)
    if spec.moe:
        recorder = Recorder(module.moe_finalize_kernel)
        monkeypatch.setattr(module, "moe_finalize_kernel", recorder)
        module.moe_finalize(call, spec, 0x1234, summed)
        grid, named, kwargs = _check_launch(recorder)
        assert named["out_ptr"] is summed and named["guard_ptr"] == 0x1234 and grid == (5,)
        assert named["idx_ptr"] is call.expert_idx and named["shared_ptr"] is call.shared
    recorder = Recorder(module.rmsnorm_epilogue_kernel)
    monkeypatch.setattr(module, "rmsnorm_epilogue_kernel", recorder)
    module.rmsnorm_epilogue(summed, call, spec)
    grid, named, kwargs = _check_launch(recorder)
    assert named["sum_ptr"] is summed and kwargs["H"] == HIDDEN and kwargs["BLOCK_H"] >= HIDDEN
    _check_call_arguments(dict(named, x_ptr=call.x), kwargs, call, spec, 0)
    rows, warps, ctas = override or (1, kwargs["num_warps"], launch_config.MAX_GRID)
    assert kwargs["ROWS"] == rows and kwargs["num_warps"] == warps
    assert grid == (min(-(-5 // rows), ctas) if ctas else -(-5 // rows),)
