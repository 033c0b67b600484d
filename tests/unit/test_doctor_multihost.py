"""doctor tells a multi-host group that only the cross-host paths may run, with the selector's own reason."""
import torch

from arfuse.backends import base
from arfuse.cli.doctor import _backend_entry
from arfuse.core.types import GroupCaps, Pattern, Problem


def test_doctor_explains_multi_host_restriction():
    caps = GroupCaps(world_size=2, rank=0, device_type="cuda", dist_backend="cpu:gloo,cuda:nccl",
                     gpu_name="NVIDIA H200", sm=(9, 0), single_host=False, p2p=False,
                     facts={"triton_symm": {"symm_mem": True, "triton": True}},
                     notes=("single_host: ranks span hosts ['hostA', 'hostB']",), allow_unverified=True)
    problem = Problem(Pattern.RESIDUAL_RMSNORM, 8, 8192, torch.bfloat16, "cuda", 2)
    symm = _backend_entry(base.get("triton_symm"), problem, caps, None)
    assert not symm["available"]
    assert "multi-host" in symm["reason"] and "hostA" in symm["reason"]
    nccl = _backend_entry(base.get("nccl"), problem, caps, None)
    assert nccl["available"], nccl
