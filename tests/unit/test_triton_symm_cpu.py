"""What arfuse's own GPU backend decides without a GPU: capability checks, per-variant size limits, workspace
layout and launch shapes."""
import pytest
import torch

from arfuse.backends import base
from arfuse.backends.symm_workspace import layout, tokens_within
from arfuse.backends.triton_symm import LAMPORT_MAX_BYTES, ONE_SHOT_MAX_BYTES, TWO_SHOT_MAX_BYTES
from arfuse.core.spec import CLASSIC_FEATURES, FusionSpec, Prologue, Quant, ScaleLayout
from arfuse.core.types import Capacity, GroupCaps, Pattern, Problem
from arfuse.kernels import launch_config, nccl_launch
from arfuse.kernels.launch_config import SymmArgs, block_config, grid_size, lamport_grid, lamport_push_split
from tests import _records

SYMM = base.get("triton_symm")
# allow_unverified: these tests are about capabilities and limits (the verification record: test_verification.py)
GOOD = GroupCaps(world_size=4, rank=0, device_type="cuda", dist_backend="cpu:gloo,cuda:nccl", gpu_name="NVIDIA H200",
                 sm=(9, 0), single_host=True, p2p=True, facts={"triton_symm": {"symm_mem": True, "triton": True}},
                 allow_unverified=True)


def problem(tokens, hidden=8192, dtype=torch.bfloat16, pattern=Pattern.RESIDUAL_RMSNORM, world=4):
    return Problem(pattern, tokens, hidden, dtype, "cuda", world)


@pytest.mark.parametrize("change,needle", [
    (dict(single_host=False), "one host"), (dict(p2p=False), "P2P"),
    (dict(facts={"triton_symm": {"symm_mem": False, "triton": True}}), "symmetric memory"),
    (dict(facts={"triton_symm": {"symm_mem": True, "triton": False}}), "Triton"),
    (dict(sm=(7, 5)), "compute capability"),
])
def test_group_requirements_are_explained(change, needle):
    caps = GroupCaps(**{**GOOD.__dict__, **change})
    for variant in SYMM.variants:
        reason = SYMM.check(problem(8), caps, variant)
        assert reason is not None and needle in reason


def test_shape_and_dtype_limits():
    assert SYMM.check(problem(8, hidden=8200), GOOD, "lamport") is None
    assert "multiple of 8" in SYMM.check(problem(8, hidden=8196), GOOD, "lamport")
    assert "exceeds 16384" in SYMM.check(problem(8, hidden=16392), GOOD, "two_shot")
    assert "world size 9" in SYMM.check(problem(8, world=9), GOOD, "two_shot")
    assert SYMM.check(problem(8, dtype=torch.float32), GOOD, "lamport_two_shot") is None


def test_variant_size_limits_and_their_boundaries():
    per_token = 8192 * 2
    last = {"lamport": LAMPORT_MAX_BYTES // per_token, "one_shot": ONE_SHOT_MAX_BYTES // per_token,
            "two_shot": TWO_SHOT_MAX_BYTES // per_token, "lamport_two_shot": TWO_SHOT_MAX_BYTES // per_token}
    for variant, n in last.items():
        assert SYMM.check(problem(n), GOOD, variant) is None, variant
        assert "limited to" in SYMM.check(problem(n + 1), GOOD, variant), variant


@pytest.mark.parametrize("variant", SYMM.variants)
def test_checks_are_monotone_in_tokens(variant):
    verdicts = [SYMM.check(problem(n, hidden=4096), GOOD, variant) is None for n in range(1, 20000, 97)]
    assert verdicts == sorted(verdicts, reverse=True)  # once refused, refused for every larger count


def test_lamport_two_shot_refuses_fp8_and_barrier_two_shot_takes_it():
    fp8 = problem(256, pattern=Pattern.RESIDUAL_RMSNORM_FP8)
    assert "FP8" in SYMM.check(fp8, GOOD, "lamport_two_shot")
    assert SYMM.check(fp8, GOOD, "two_shot") is None


@pytest.mark.parametrize("hidden,world,tokens", [(8192, 4, 2048), (5120, 3, 1000), (4096, 8, 1), (8, 2, 7)])
def test_workspace_layout_is_aligned_and_disjoint(hidden, world, tokens):
    cap = Capacity(tokens, hidden, torch.bfloat16, torch.device("cpu"))
    lay = layout(hidden, world, tokens_within(cap, ONE_SHOT_MAX_BYTES), tokens_within(cap, LAMPORT_MAX_BYTES),
                 tokens_within(cap, TWO_SHOT_MAX_BYTES))
    starts = sorted(lay.offsets.values())
    assert all(o % 64 == 0 for o in starts) and lay.total % 64 == 0
    assert starts == [lay.offsets[k] for k in ("one_shot", "zero_copy", "two_shot", "gather", "lamport", "lts_rs",
                                              "lts_gather")]
    assert lay.offsets["zero_copy"] - lay.offsets["one_shot"] == 2 * lay.one_shot_half >= 2 * tokens * hidden
    assert lay.offsets["gather"] - lay.offsets["two_shot"] == world * lay.two_shot_slot
    assert lay.two_shot_slot >= -(-tokens // world) * hidden and lay.gather >= tokens * hidden
    assert lay.total - lay.offsets["lts_gather"] == 2 * lay.gather  # the sentinel-filled tail ends the buffer


def test_tokens_within_bounds():
    cap = Capacity(4096, 8192, torch.bfloat16, torch.device("cpu"))
    assert tokens_within(cap, LAMPORT_MAX_BYTES) == 128
    assert tokens_within(cap, 1) == 1  # at least one row
    assert tokens_within(Capacity(16, 8192, torch.bfloat16, torch.device("cpu")), ONE_SHOT_MAX_BYTES) == 16


def test_launch_shapes():
    assert block_config(8192) == (8192, 16)
    assert block_config(100) == (128, 4)
    assert grid_size(0) == 1 and grid_size(10_000) == 528 and grid_size(10_000, cap=288) == 288
    with pytest.raises(TypeError, match="missing"):
        SymmArgs(rank=0)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 64, 128, 256])
@pytest.mark.parametrize("hidden", [128, 4096, 5120, 8192, 16384])
def test_lamport_push_split_keeps_chunks_whole_and_the_grid_resident(rows, hidden):
    block_h, _ = block_config(hidden)
    split = lamport_push_split(rows, block_h, sms=132)
    assert split & (split - 1) == 0 and block_h % split == 0  # power-of-2 chunks of the padded row
    assert split == 1 or block_h // split >= launch_config.PUSH_CHUNK_MIN
    grid = lamport_grid(rows, split, sms=132)
    assert grid <= (132 if split > 1 else launch_config.MAX_GRID)  # a split push needs every CTA resident
    assert grid >= min(rows, 132)  # never fewer CTAs than the unsplit kernel had rows to poll (up to the SMs)


def test_lamport_push_split_spreads_one_token_and_override_wins(monkeypatch):
    assert lamport_push_split(1, 8192, sms=132) == 8
    assert [lamport_push_split(n, 8192, sms=132) for n in (4, 16, 64)] == [2, 2, 2]
    assert lamport_push_split(128, 8192, sms=132) == 1 and lamport_push_split(1, 4096, sms=132) == 4
    monkeypatch.setattr(launch_config, "LAMPORT_PUSH_SPLIT", 3)
    assert lamport_push_split(128, 8192, sms=132) == 2  # rounded down to a power of 2
    monkeypatch.setattr(launch_config, "LAMPORT_PUSH_SPLIT", 1)
    assert lamport_push_split(1, 8192, sms=132) == 1


NCCL = base.get("nccl")
NEW_SPECS = [FusionSpec(weight_offset=True), FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
             FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0),
             FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True)]


@pytest.mark.parametrize("spec", NEW_SPECS, ids=str)
def test_features_the_record_does_not_vouch_for_are_refused(spec, monkeypatch, tmp_path):
    """Evidence for the classic features on two_shot and for every feature on the nccl path: the new features are
    refused on two_shot (ARFUSE_ALLOW_UNVERIFIED=1 runs them) and run on the nccl path."""
    monkeypatch.delenv(base.ALLOW_UNVERIFIED_ENV, raising=False)
    strict_caps = GroupCaps(**{**GOOD.__dict__, "allow_unverified": None})
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/two_shot", _records.entry("triton_symm/two_shot",
                                                                                           CLASSIC_FEATURES)),
                            ("nccl", _records.entry("nccl", base.ALL_FEATURES, kind="one_gpu"))):
        p = Problem(spec, 64, 4096, torch.bfloat16, "cuda", GOOD.world_size)
        assert "not yet verified on GPUs" in SYMM.check(p, strict_caps, "two_shot")
        assert SYMM.check(Problem(Pattern.RESIDUAL_RMSNORM_FP8, 64, 4096, torch.bfloat16, "cuda", 4), strict_caps,
                          "two_shot") is None
        monkeypatch.setenv(base.ALLOW_UNVERIFIED_ENV, "1")
        assert SYMM.check(p, strict_caps, "two_shot") is None
        monkeypatch.delenv(base.ALLOW_UNVERIFIED_ENV)
        nccl_caps = GroupCaps(**{**strict_caps.__dict__, "world_size": 1})
        assert NCCL.check(Problem(spec, 64, 4096, torch.bfloat16, "cuda", 1), nccl_caps, "default") is None


@pytest.mark.parametrize("group_size,ok", [(128, True), (64, True), (8, True), (96, False), (4, False)])
def test_kernels_refuse_group_sizes_they_cannot_reshape(group_size, ok, monkeypatch):
    monkeypatch.setenv(base.ALLOW_UNVERIFIED_ENV, "1")
    spec = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=group_size, scale_layout=ScaleLayout.FP32)
    p = Problem(spec, 16, 3072, torch.bfloat16, "cuda", 4)
    for backend, variant in ((SYMM, "lamport"), (NCCL, "default")):
        reason = backend.check(p, GOOD, variant)
        assert (reason is None) if ok else ("not a power of two" in reason), (backend.name, reason)


def test_lamport_two_shot_refuses_every_quantization(monkeypatch):
    monkeypatch.setenv(base.ALLOW_UNVERIFIED_ENV, "1")
    for spec in NEW_SPECS[1:3]:
        assert "FP8" in SYMM.check(Problem(spec, 256, 8192, torch.bfloat16, "cuda", 4), GOOD, "lamport_two_shot")
    assert SYMM.check(Problem(NEW_SPECS[3], 256, 8192, torch.bfloat16, "cuda", 4), GOOD, "lamport_two_shot") is None


def test_epilogue_launch_defaults_table_and_override(monkeypatch, tmp_path):
    # a size the tables do not list takes the default launch; a listed one its (rows, warps, CTA cap) by token range
    from arfuse.kernels import launch_table

    monkeypatch.setenv(launch_table.PATH_ENV, str(tmp_path / "launch.json"))
    launch_table.reload()
    assert nccl_launch.epilogue_launch(3072, 64) == nccl_launch.EpilogueLaunch(4096, 1, 8, launch_config.MAX_GRID)
    assert nccl_launch.epilogue_launch(5120, 64) == nccl_launch.EpilogueLaunch(8192, 1, 4, 0)
    entry = launch_table.make_entry("epilogue", 5120, [(64, dict(rows=4, num_warps=8, max_ctas=0)),
                                                       (None, dict(rows=2, num_warps=8, max_ctas=16,
                                                                   evict_first=True))])
    launch_table.save(launch_table.Table((entry,), "test"), tmp_path / "launch.json")
    assert nccl_launch.epilogue_launch(5120, 64) == nccl_launch.EpilogueLaunch(8192, 4, 8, 0)
    assert nccl_launch.epilogue_grid(10, nccl_launch.epilogue_launch(5120, 10)) == 3  # one CTA per 4-row tile
    assert nccl_launch.epilogue_launch(5120, 65) == nccl_launch.EpilogueLaunch(8192, 2, 8, 16, True)
    monkeypatch.setattr(nccl_launch, "EPILOGUE_OVERRIDE", (2, 4, 16))
    launch = nccl_launch.epilogue_launch(4096, 1000)
    assert launch.rows == 2 and nccl_launch.epilogue_grid(1000, launch) == 16 and not launch.evict_first
    assert nccl_launch.epilogue_grid(1, launch) == 1
    launch_table.reload()
