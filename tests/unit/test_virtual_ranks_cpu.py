"""Virtual ranks (:mod:`arfuse.testing.virtual_ranks`) on the CPU: how the ranks' workspaces and launch arguments
are built (by the production code), the grid caps, and - under Triton's interpreter, one thread per rank - every
``triton_symm`` kernel run end to end at 2 and 3 ranks against the float64 reference, bitwise identical across
ranks, in place, zero-copy, a bad MoE index and a rank skipping a call.

The interpreter runs no PTX: ``_sync``'s timer and flag primitives run as stand-ins (arfuse.testing.sync_standins),
every load and store is sequentially consistent and each rank is one CTA, so this checks the kernels' logic, not
the GPU's memory ordering or the compiled code (tests/gpu/test_virtual_ranks_gpu.py and bench/verify_kernels.py
run them on a GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arfuse.backends import symm_workspace as sw
from arfuse.core.spec import RESIDUAL_RMSNORM
from arfuse.testing.virtual_ranks import VirtualRanks

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("world", [2, 3, 8])
def test_every_rank_has_its_own_memory_and_every_ranks_addresses(world):
    vr = VirtualRanks(world, 8, 256, torch.bfloat16, "cpu", sms=132)
    args = [ws.args for ws in vr.workspaces]
    buffers = [ws.buffer.data_ptr() for ws in vr.workspaces]
    pads = [p.data_ptr() for p in vr.pads]
    assert len(set(buffers)) == world and len(set(pads)) == world
    for rank, a in enumerate(args):
        assert a.rank == rank and a.world_size == world
        assert a.peer_ptrs == tuple(buffers) + (0,) * (8 - world) and a.pad_ptrs == tuple(pads) + (0,) * (8 - world)
        mem = vr.workspaces[rank].memory
        assert a.err_ptr == mem.err.data_ptr() and a.guard_ptr == mem.index_guard.ptr
        assert a.lamport_state.data_ptr() == mem.state.data_ptr()  # counters in this rank's own state
        assert (a.max_grid, a.sms) == (132 // world, 132)  # all W grids resident; splits as on the whole GPU
        assert a.barrier_slots == sw.DEFAULT_SIGNAL_PAD_BYTES // (4 * world)
    guards = {ws.index_guard.ptr for ws in vr.workspaces}
    assert len(guards) == world
    lay = sw.layout(256, world, 8, 8, 8)
    assert args[0].lamport_off == lay.offsets["lamport"] and vr.workspaces[0].buffer.numel() == lay.total
    tail = vr.workspaces[1].buffer[lay.offsets["lamport"]:].view(torch.int16)
    assert bool((tail == -32768).all())  # the barrier-free regions start as "not yet written"
    vr.close()


def test_grids_stay_within_the_per_rank_cap():
    from arfuse.kernels.launch_config import grid_size, lamport_grid, lamport_push_split

    vr = VirtualRanks(8, 4096, 8192, torch.bfloat16, "cpu", sms=132)
    a = vr.workspaces[0].args
    for rows in (1, 3, 17, 128, 1000, 4096):
        split = lamport_push_split(rows, 8192, a.sms)
        assert split == lamport_push_split(rows, 8192, 132)  # the split a real rank of a 132-SM GPU takes
        assert lamport_grid(rows, split, a.sms, a.max_grid) <= 132 // 8
        assert grid_size(rows, min(a.max_grid, a.barrier_slots)) <= 132 // 8
    vr.close()


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="world_size must be in 2..8"):
        VirtualRanks(9, 8, 256, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="cannot hold one CTA for each of 4 ranks"):
        VirtualRanks(4, 8, 256, torch.bfloat16, "cpu", sms=3)
    vr = VirtualRanks(2, 8, 256, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="2 ranks need 2 calls, got 1"):
        vr.run("lamport", RESIDUAL_RMSNORM, [None])
    vr.close()


def test_symm_args_needs_every_ranks_addresses():
    vr = VirtualRanks(2, 8, 256, torch.bfloat16, "cpu")
    ws = vr.workspaces[0]
    lay = sw.layout(256, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="2 ranks need 2 buffer and signal-pad addresses, got 1 and 2"):
        sw.symm_args(ws.capacity, lay, ws.memory, [1], [1, 2], 0, 2, vr.limits)
    vr.close()


INTERPRETED = """
import json, sys, torch
from arfuse.testing import interpreter
interpreter.patch()
interpreter.install_sync_standins()
from arfuse.core import spec as S
from arfuse.testing import symm_checks as checks, verification_run as vrun

specs = (S.RESIDUAL_RMSNORM, S.ALLREDUCE, S.RESIDUAL_RMSNORM_FP8,
         S.FusionSpec(quant=S.Quant.FP8_PER_TOKEN_GROUP, group_size=32, scale_layout=S.ScaleLayout.UE8M0,
                      also_norm=True, weight_offset=True),
         S.FusionSpec(prologue=S.Prologue.MOE_FINALIZE, shared_expert=True,
                      quant=S.Quant.FP8_PER_TOKEN, scale_layout=S.ScaleLayout.FP32))
points = checks.matrix((2, 3), (64,), (1, 5), specs)
timeouts = [dict(world=w, variant=v, hidden=64, dtype=torch.bfloat16, timeout_s=0.5, slack_s=60, tokens=3)
            for w in (2, 3) for v in checks.VARIANTS]
results = vrun.run([points], "cpu", protocol=dict(timeouts=timeouts, graphs=[]))
print(json.dumps(dict(results=results, evidence=vrun.evidence([results], "tests", require=("timeout",)))))
"""


@pytest.mark.triton
@pytest.mark.slow
def test_every_variant_runs_correctly_on_interpreted_virtual_ranks():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    results = found["results"]
    modes = {p["mode"] for p in results["points"]}
    assert modes == {"plain", "inplace", "zero_copy", "bad_index"} and len(results["points"]) >= 90
    bad = [p for p in results["points"] + results["timeouts"] if not p["ok"]]
    assert not bad, bad[:3]
    assert all(c["ok"] and c["elapsed_s"] >= 0.5 for c in results["timeouts"])
    for path, entry in found["evidence"].items():
        assert entry["ok"] and entry["world_sizes"] == [2, 3] and entry["refused"] == {}, (path, entry)
        assert {"moe_finalize", "fp8_group", "ue8m0", "weight_offset", "also_norm"} <= set(entry["features"])
        assert entry["features_by_world"] == {w: {"bfloat16": entry["features"]} for w in ("2", "3")}, path
        assert entry["recordable"] and entry["gaps"] == [], path
