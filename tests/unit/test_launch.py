"""``arfuse.launch``: results come back by rank, per-rank environment reaches its rank, a raising rank fails the
launch with its traceback, and a launch that outlives its bound is killed (nothing is left running)."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch.distributed as dist

from arfuse import launch


def _report(rank, world_size, tag):
    return dict(rank=rank, world=world_size, tag=tag, dist_rank=dist.get_rank(), dist_world=dist.get_world_size(),
                backend=str(dist.get_backend()), env=os.environ.get("ARFUSE_TEST_VAR"),
                shared=os.environ.get("ARFUSE_TEST_SHARED"), guard=os.environ.get("NCCL_NVLS_ENABLE"))


def _raise(rank, world_size):
    raise ValueError(f"rank {rank} is unhappy")


def _sleep_forever(rank, world_size):
    time.sleep(600)


def test_results_come_back_in_rank_order_with_each_ranks_environment():
    results = launch.run_ranks(_report, 2, "hello", device="cpu", timeout_s=120,
                               env={"ARFUSE_TEST_SHARED": "both"},
                               rank_env=[{"ARFUSE_TEST_VAR": "zero"}, {"ARFUSE_TEST_VAR": "one"}])
    assert [r["rank"] for r in results] == [0, 1] == [r["dist_rank"] for r in results]
    assert all(r["world"] == r["dist_world"] == 2 and r["tag"] == "hello" for r in results)
    assert all(r["backend"] == "gloo" and r["shared"] == "both" and r["guard"] == "0" for r in results)
    assert [r["env"] for r in results] == ["zero", "one"]


def test_a_raising_rank_fails_the_launch_with_its_traceback():
    with pytest.raises(launch.RankFailed, match="rank 0 raised") as info:
        launch.run_ranks(_raise, 1, device="cpu", timeout_s=120)
    assert "ValueError: rank 0 is unhappy" in str(info.value)
    assert not multiprocessing.active_children()


def test_a_launch_past_its_bound_is_killed():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within 4 s"):
        launch.run_ranks(_sleep_forever, 1, device="cpu", timeout_s=4)
    assert time.monotonic() - t0 < 30
    assert not multiprocessing.active_children()


def test_cuda_launch_needs_one_gpu_per_rank(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks need 2 GPUs, found 1"):
        launch.run_ranks(_report, 2, "x", device="cuda")


def test_under_torchrun_reads_the_launcher_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert not launch.under_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.under_torchrun()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert launch.under_torchrun()


def test_free_port_is_bindable():
    import socket

    port = launch.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
