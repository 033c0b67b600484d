"""The host benchmark's pure parts (``arfuse bench --host``): the profile's attribution of time to the parts of a
call, the targets' verdicts, the case list and the document check. The command itself runs in
``tests/multirank/test_host_bench_cpu.py``."""
from __future__ import annotations

import pytest
import torch

from arfuse.bench import host_cases, host_profile, host_report
from arfuse.core import validate


def test_profile_time_goes_to_the_part_of_the_function_or_of_its_caller():
    def call():
        validate.check_eps("op", 1e-6)  # arfuse's validation
        torch.empty(4)  # an allocation, whoever calls it
        torch.zeros(4).add_(1.0)  # a builtin outside arfuse: counts for its caller (this test: "other")

    parts = host_profile.profile_call(call, 200, torch.device("cpu"))
    assert set(parts) <= set(host_profile.PARTS)
    assert parts["validation"] > 0 and parts["output allocation"] > 0 and parts["other"] > 0
    scaled = host_profile.scaled(parts, 10.0)
    assert abs(sum(scaled.values()) - 10.0) < 1e-9


def test_every_public_op_and_form_is_a_case_and_a_filter_selects():
    cfg = host_cases.HostConfig(hidden=256)
    names = [c.name for c in host_cases.cases(cfg)]
    for op in ("residual_rmsnorm", "rmsnorm", "all_reduce", "residual_rmsnorm_fp8", "per-token", "group128",
               "ue8m0", "moe_finalize_residual_rmsnorm", "FusedAddRMSNorm.forward", "functional.residual_rmsnorm",
               "functional.rmsnorm", "functional.all_reduce", "inplace", "out="):
        assert any(op in n for n in names), op
    assert not [c for c in host_cases.cases(host_cases.HostConfig(hidden=96)) if c.spec.group_size]  # 128 does not divide
    assert [c.name for c in host_cases.cases(host_cases.HostConfig(cases=("moe",)))] == ["moe_finalize_residual_rmsnorm"]


@pytest.mark.parametrize("device,backend,arfuse_us,bare_us,ok", [
    ("cuda", "nccl", 25.0, 15.0, True), ("cuda", "nccl", 26.0, 15.0, False),
    ("cpu", "torch_ref", 29.0, 20.0, True), ("cpu", "torch_ref", 31.0, 20.0, False),
    ("cuda", "torch_ref", 31.0, 20.0, False),  # torch_ref is judged by its overhead, on any device
])
def test_verdict_applies_each_target(device, backend, arfuse_us, bare_us, ok):
    row = {"backend": backend, "timing": {"arfuse": {"us": arfuse_us}, "bare": {"us": bare_us}}}
    assert host_report.verdict(row, device).endswith("ok" if ok else "MISSED")


def test_validate_refuses_other_documents():
    with pytest.raises(ValueError):
        host_report.validate({"format": "arfuse-bench"})
    with pytest.raises(ValueError):
        host_report.validate({"format": host_report.FORMAT, "version": host_report.VERSION, "runs": [{"rows": [{"case": "x"}]}]})


def test_the_anchor_targets_are_the_issue_s():
    by_name = {c.name: c for c in host_cases.cases(host_cases.HostConfig(hidden=256))}
    assert by_name["residual_rmsnorm"].anchor_target == 1.5  # the public op, allocating its outputs
    assert all(c.anchor_target == 2.0 for n, c in by_name.items() if n != "residual_rmsnorm")


@pytest.mark.parametrize("arfuse_us,anchor_us,target,ok", [(14.0, 10.0, 1.5, True), (16.0, 10.0, 1.5, False),
                                                           (20.0, 10.0, 2.0, True), (20.5, 10.0, 2.0, False)])
def test_anchor_verdict_judges_the_fastest_rounds(arfuse_us, anchor_us, target, ok):
    row = {"anchor_target": target, "timing": {"arfuse": {"us": 99.0, "min_us": arfuse_us},
                                               "anchor": {"us": 1.0, "min_us": anchor_us}}}
    assert host_report.anchor_verdict(row).endswith("ok" if ok else "MISSED")
    assert host_report.anchor_verdict({"timing": {"arfuse": {"us": 1.0, "min_us": 1.0}}}) == ""
