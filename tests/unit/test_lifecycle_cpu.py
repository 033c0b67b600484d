"""Lifecycle on CPU: many create/close cycles leave nothing behind, close is idempotent, and a process that exits
without closing (with or without a live process group) exits cleanly.

"Nothing behind", after a first cycle that may warm caches: open file descriptors (/proc/self/fd), Python threads
and OS threads (/proc/self/task) back to their values, no entries left in the op's handle registry
(``arfuse.runtime.custom_op``) and no Executor objects alive, every workspace closed. 200 cycles at world size 1,
50 on 2 gloo ranks (where construction is collective and a backend that fails on rank 1 is dropped by vote in every
cycle).
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from tests._ranks import launch

import arfuse
from arfuse.runtime import custom_op
from arfuse.runtime.executor import Executor
from arfuse.testing import save_figures
from arfuse.testing.faults import FaultBackend, registered
from arfuse.verify import TOLERANCE, Case, poison, reference, rel_err

REPO = Path(arfuse.__file__).resolve().parent.parent
HIDDEN = 64


def resources() -> dict:
    """What a leak would grow: fds, threads, live handles and executors."""
    gc.collect()
    return dict(fds=len(os.listdir("/proc/self/fd")), threads=threading.active_count(),
                tasks=len(os.listdir("/proc/self/task")), handles=len(custom_op._executors),
                executors=sum(type(o) is Executor for o in gc.get_objects()))


def _cycle(group, rank: int, world: int, seed: int, backend: str) -> float:
    """Create, make one checked call, close twice; returns the call's error against the reference."""
    fusion = arfuse.AllReduceFusion(group, max_tokens=16, hidden_size=HIDDEN, dtype=torch.float32, device="cpu",
                                    backend=backend)
    case = Case(5, HIDDEN, torch.float32, seed)
    out = poison(torch.empty(5, HIDDEN))
    norm, res = fusion.residual_rmsnorm(case.x(rank), case.residual(), case.weight(), case.eps, norm_out=out)
    ref_norm, ref_res = reference(case, world, arfuse.Pattern.RESIDUAL_RMSNORM)
    err = max(rel_err(norm, ref_norm), rel_err(res, ref_res))
    fusion.close()
    fusion.close()
    if not fusion.closed:
        return float("inf")
    return err


def _cycles(rank: int, world: int, n: int, group=None) -> dict:
    """``n`` cycles alternating a named reference object and an auto object beside a backend whose prepare fails
    on rank 1 (world size > 1) or that prepares and is used (world size 1)."""
    fault = FaultBackend("test_lifecycle_fault", priority=1, prepare_fails_on=(1,))
    with registered(fault):
        worst = max(_cycle(group, rank, world, 0, b) for b in ("torch_ref", "auto"))  # warm-up
        start = resources()
        for i in range(1, n):
            worst = max(worst, _cycle(group, rank, world, i, "torch_ref" if i % 2 else "auto"))
        end = resources()
    return dict(start=start, end=end, worst=worst, live=fault.live, made=len(fault.made), prepared=fault.prepared)


def _judge(got: dict, context: str) -> list:
    # a leak grows; a count that fell (gloo or the interpreter closing a descriptor of its own) is none
    problems = [f"{context}: {k} {got['start'][k]} -> {got['end'][k]}" for k in got["start"]
                if got["end"][k] > got["start"][k]]
    if got["live"]:
        problems.append(f"{context}: {got['live']} fault workspaces never closed")
    if not got["worst"] <= TOLERANCE[torch.float32]:
        problems.append(f"{context}: a call was wrong (error {got['worst']})")
    return problems


def test_200_cycles_at_world_size_1_leave_nothing_behind():
    got = _cycles(0, 1, 200)
    problems = _judge(got, "world size 1")
    assert got["made"] >= 100, got  # auto really used the extra backend every other cycle
    save_figures("lifecycle_cpu_ws1", dict(cases=200, replays=0, faults_injected=0, faults_survived=0, hangs=0,
                                           wrong_results=int(not got["worst"] <= TOLERANCE[torch.float32]),
                                           worst_error=got["worst"]), got)
    assert not problems, "\n".join(problems)


def _two_rank_cycles(rank, world):
    return _cycles(rank, world, 50)


def test_50_cycles_on_two_ranks_leave_nothing_behind():
    per_rank = launch(_two_rank_cycles, 2, timeout_s=120)
    problems = [p for rank, got in enumerate(per_rank) for p in _judge(got, f"rank {rank}")]
    assert per_rank[0]["made"] == per_rank[0]["prepared"] >= 25, per_rank[0]  # rank 0 prepared, then dropped it
    assert per_rank[1]["made"] == 0, per_rank[1]
    save_figures("lifecycle_cpu_ws2", dict(cases=50 * 2, replays=0, faults_injected=per_rank[1]["prepared"],
                                           faults_survived=per_rank[1]["prepared"] if not problems else 0, hangs=0,
                                           wrong_results=sum(not g["worst"] <= TOLERANCE[torch.float32]
                                                             for g in per_rank),
                                           worst_error=max(g["worst"] for g in per_rank)), per_rank)
    assert not problems, "\n".join(problems)


def test_close_is_idempotent_and_closed_objects_refuse_calls():
    fusion = arfuse.AllReduceFusion(max_tokens=4, hidden_size=HIDDEN, dtype=torch.float32, device="cpu")
    workspaces = list(fusion._executor.workspaces.values())
    for _ in range(3):
        fusion.close()
        assert fusion.closed and all(ws.closed for ws in workspaces)
    with pytest.raises(ValueError, match="all_reduce: this AllReduceFusion is closed"):
        fusion.all_reduce(torch.ones(2, HIDDEN))
    with fusion:  # entering a closed object and leaving it again is harmless
        pass
    assert fusion.closed


EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, arfuse
    from arfuse import functional as F
    from arfuse.backends.torch_ref import RefWorkspace
    from arfuse.testing.faults import FaultBackend, FaultWorkspace
    from arfuse.backends.base import register

    class Announcing(FaultWorkspace):
        def _release(self):
            super()._release()
            os.write(1, b"released\\n")

    class Announced(FaultBackend):
        def prepare(self, capacity, caps, group):
            return Announcing(self, group, caps.world_size)

    mode = sys.argv[1]
    if mode != "no_group":
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    register(Announced("test_exit", priority=1))
    register(FaultBackend("test_exit_broken", priority=0, prepare_fails_on=(0,)))
    opts = dict(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu")
    kept = [arfuse.AllReduceFusion(**opts), arfuse.AllReduceFusion(backend="test_exit", **opts)]
    assert "test_exit_broken" in kept[0].disabled
    kept[1].all_reduce(torch.ones(2, 16))
    F.rmsnorm(torch.ones(3, 16), torch.ones(16))  # a cached functional object, never closed
    if mode == "group_destroyed":
        dist.destroy_process_group()  # the objects outlive their process group
    print("exiting", flush=True)
""")


@pytest.mark.parametrize("mode", ["no_group", "group_alive", "group_destroyed"])
def test_exit_without_close_is_clean(mode):
    from arfuse.launch import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mode, str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for marker in ("Traceback", "Exception ignored", "Error"):
        assert marker not in done.stderr, done.stderr
    lines = done.stdout.split()
    # the two kept objects and the functional one all used test_exit (auto prefers it)
    assert lines[:1] == ["exiting"] and lines.count("released") == 3, done.stdout
