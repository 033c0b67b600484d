"""Start N ranks on this host with ``torch.multiprocessing`` (or join a ``torchrun`` launch) and collect results.

``run_ranks(fn, world_size, *args)`` spawns one process per rank, initialises the default process group (NCCL
with one GPU per rank when ``device="cuda"``, gloo on CPU), calls ``fn(rank, world_size, *args)`` and returns
the per-rank return values. A rank that raises makes ``run_ranks`` raise :class:`RankFailed` with its traceback;
a launch that outlives ``timeout_s`` is killed and raises ``TimeoutError`` (nothing is left waiting).
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MULTICAST_GUARDS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RankFailed(RuntimeError):
    """A spawned rank raised; the message carries its rank and traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_rank(rank: int, world_size: int, device: str, timeout_s: float = 300.0) -> torch.device:
    """Initialise the default process group for this rank; returns the rank's device."""
    for k, val in MULTICAST_GUARDS.items():
        os.environ.setdefault(k, val)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), device_id=dev)
        return dev
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device("cpu")


def _worker(rank: int, world_size: int, port: int, device: str, env: Dict[str, str], fn: Callable, args: tuple,
            results) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    if device == "cpu":  # the ranks share this host's cores; oversubscribed OpenMP threads spin and crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init_rank(rank, world_size, device)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report anything, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args, device: Optional[str] = None, timeout_s: float = 600.0,
              env: Optional[Dict[str, str]] = None, rank_env: Optional[List[Dict[str, str]]] = None) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return the results by rank.

    ``fn`` must be importable (a module-level function). ``rank_env[r]`` adds environment variables for rank r
    only (e.g. a simulated hostname).
    """
    device = device or default_device()
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"run_ranks: {world_size} ranks need {world_size} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_vars = dict(env or {}, **(rank_env[rank] if rank_env else {}))
        p = ctx.Process(target=_worker, args=(rank, world_size, port, device, rank_vars, fn, args, results),
                        daemon=False)
        p.start()
        procs.append(p)
    out: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run_ranks: ranks {sorted(set(range(world_size)) - set(out))} did not finish "
                                   f"within {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RankFailed(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} raised:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
