"""The FlashInfer workspace vote on 2 CPU ranks (gloo): a fake FlashInfer whose workspace creation raises on
rank 1 only must make every rank fall back together, with a reason naming rank 1; strict mode must make every rank
raise; a healthy fake must succeed on every rank. One launch covers all three, under a wall-clock bound.

(The FlashInfer backend's check refuses CPU devices, so this drives the workspace manager directly.)
"""
import time

import torch

from arfuse.backends.flashinfer_workspace import WorkspaceManager, WorkspaceUnavailable
from arfuse.core.errors import FallbackError
from arfuse.launch import run_ranks
from tests.unit import fake_flashinfer as ff

WALL_S = 60.0


def _acquire(manager, probe, strict):
    try:
        shared = manager.acquire(None, dtype=torch.bfloat16, device=torch.device("cpu"), max_tokens=8, hidden=64,
                                 probe=probe, strict=strict)
        return "ok", shared
    except WorkspaceUnavailable as e:
        return "fallback", e.reason
    except FallbackError as e:
        return "raised", e.reason


def vote_worker(rank, world, failing_dir, healthy_dir):
    start = time.monotonic()
    out = {}
    with ff.loaded(failing_dir) as probe:
        manager = WorkspaceManager()
        out["lenient"] = _acquire(manager, probe, strict=False)
        out["strict"] = _acquire(manager, probe, strict=True)
        out["destroyed"] = sum(c[0] == "workspace.destroy" for c in ff.calls())
        out["live"] = len(manager.live())
    with ff.loaded(healthy_dir) as probe:
        manager = WorkspaceManager()
        status, shared = _acquire(manager, probe, strict=True)
        out["healthy"] = (status, shared.refs if status == "ok" else shared)
        manager.release(shared)
    out["elapsed"] = time.monotonic() - start
    return out


def test_workspace_vote_falls_back_together(tmp_path):
    failing = str(ff.write(tmp_path, "0.7.2.post1", fail_create_on_rank=1))
    healthy = str(ff.write(tmp_path, "0.7.2.post1"))
    start = time.monotonic()
    results = run_ranks(vote_worker, 2, failing, healthy, device="cpu", timeout_s=WALL_S)
    assert time.monotonic() - start < WALL_S
    for rank, r in enumerate(results):
        assert r["lenient"][0] == "fallback", (rank, r)
        assert r["lenient"][1].startswith("rank 1: RuntimeError") and "failed on rank 1" in r["lenient"][1]
        assert r["strict"][0] == "raised" and "rank 1: RuntimeError" in r["strict"][1], (rank, r)
        assert r["live"] == 0
        assert r["healthy"] == ("ok", 1)
        assert r["elapsed"] < WALL_S
    assert results[0]["lenient"][1] == results[1]["lenient"][1]  # every rank reports the same reason
    assert results[0]["destroyed"] == 2  # rank 0 created twice and destroyed both after the vote
    assert results[1]["destroyed"] == 0  # rank 1 never got one
