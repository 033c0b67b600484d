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
from arfuse.core.types import Capacity
from arfuse.kernels.launch_config import SymmArgs

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
    return sw.SymmWorkspace(cap, None, rank, world, one_shot_tokens=sw.tokens_within(cap, ONE_SHOT_MAX_BYTES),
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


@pytest.mark.triton  # the launchers' modules define @triton.jit kernels at import
@pytest.mark.parametrize("tokens", [1, 4, 17, TOKENS])
@pytest.mark.parametrize("variant", ["lamport", "one_shot", "two_shot", "lamport_two_shot"])
def test_every_launcher_passes_each_kernel_argument_once(group, fake_cuda, monkeypatch, variant, tokens):
    import importlib

    from arfuse.core.types import Pattern

    module = importlib.import_module(f"arfuse.kernels.{variant}")
    recorder = Recorder(getattr(module, f"{variant}_kernel"))
    monkeypatch.setattr(module, f"{variant}_kernel", recorder)
    ws = _workspace()
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
    extra = {"copy_in": True} if variant == "one_shot" else {}
    getattr(module, variant)(ws.args, x, x.clone(), torch.ones(HIDDEN, dtype=torch.bfloat16), 1e-6, None,
                             torch.empty_like(x), torch.empty_like(x), int(Pattern.RESIDUAL_RMSNORM), **extra)
    grid, named, kwargs = _check_launch(recorder)
    assert named["x_ptr"] is x and kwargs["RANK"] == 0 and kwargs["H"] == HIDDEN
    if variant == "lamport":
        assert grid[0] >= tokens and HIDDEN // kwargs["SPLIT"] >= 1 and grid[0] <= max(tokens, ws.args.sms)


@pytest.mark.triton
def test_nccl_path_norm_launcher_passes_each_kernel_argument_once(monkeypatch):
    from arfuse.core.types import Pattern
    from arfuse.kernels import add_rmsnorm as module

    recorder = Recorder(module.add_rmsnorm_kernel)
    monkeypatch.setattr(module, "add_rmsnorm_kernel", recorder)
    x = torch.randn(5, HIDDEN)
    module.add_rmsnorm(x, x.clone(), torch.ones(HIDDEN), 1e-6, None, torch.empty_like(x), torch.empty_like(x),
                       int(Pattern.RESIDUAL_RMSNORM))
    grid, named, kwargs = _check_launch(recorder)
    assert named["sum_ptr"] is x and grid == (5,) and kwargs["H"] == HIDDEN
