"""The MoE index guard's report path without a GPU: a kernel's record (1 in the host-mapped int32) makes
``check_health()`` raise ValueError naming the argument, and nothing is raised before."""
import pytest
import torch

import arfuse
from arfuse.backends.base import IndexGuard


def test_a_recorded_index_out_of_range_makes_check_health_raise():
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=64, dtype=torch.float32, device="cpu") as fusion:
        guard = IndexGuard(torch.device("cpu"))
        ws = next(iter(fusion._executor.workspaces.values()))
        ws.index_guard = guard
        fusion.check_health()
        guard.host[0] = 1  # what the kernels' record writes through guard.ptr
        with pytest.raises(ValueError, match=r"permuted_idx held an index outside \[0, P\)"):
            fusion.check_health()


def test_record_from_torch_ops_sets_the_host_flag():
    guard = IndexGuard(torch.device("cpu"))
    guard.record(torch.tensor([False, False]))
    assert guard.message() is None
    guard.record(torch.tensor([False, True]))
    assert guard.message() is not None and int(guard.host[0]) == 1
