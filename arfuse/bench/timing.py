"""Time one collective call the same way for every path, as ``PERFORMANCE.md`` ("How to measure") prescribes.

CUDA: warm up eagerly on a side stream, capture ``calls_per_graph`` calls in one CUDA graph, replay it
``warmup`` times, ``dist.barrier()`` so the ranks start together, then time ``replays`` replays with CUDA events;
the result is the mean per call, and :func:`max_over_ranks` takes the slowest rank. CPU: eager wall-clock, the
median of ``cpu_repeats`` samples of ``calls_per_graph`` calls, each sample after a barrier - a different method,
labelled as such, never compared with GPU figures.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

from arfuse.probe import vote


@dataclass(frozen=True)
class TimingConfig:
    """How many calls to time; the defaults are the method of ``PERFORMANCE.md``."""

    calls_per_graph: int = 10
    warmup: int = 3
    replays: int = 20
    cpu_repeats: int = 7

    def __post_init__(self) -> None:
        for name in ("calls_per_graph", "warmup", "replays", "cpu_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise ValueError(f"TimingConfig: {name} must be a positive int, got {value!r}")

    def method(self, device_type: str) -> str:
        """A label for the JSON and the tables saying how the figures were taken."""
        if device_type == "cuda":
            return (f"cuda-graph: {self.calls_per_graph} calls per graph, {self.warmup} warm-up replays, mean of "
                    f"{self.replays} replays per call, max over ranks")
        return (f"cpu-eager: wall-clock median of {self.cpu_repeats} samples of {self.calls_per_graph} calls, "
                f"max over ranks (not comparable to GPU)")


def _barrier(group) -> None:
    if vote.is_distributed(group) and vote.world_size(group) > 1:
        dist.barrier(group=group)


def time_cuda_graph(fn: Callable[[], object], group, cfg: TimingConfig) -> float:
    """Mean µs per call of ``fn`` replayed from a CUDA graph on this rank. Collective (``fn`` is)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy initialisation and compilation must happen before capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread may query events while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(cfg.calls_per_graph):
            fn()
    try:
        for _ in range(cfg.warmup):
            graph.replay()
        torch.cuda.synchronize()
        _barrier(group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(cfg.replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (cfg.replays * cfg.calls_per_graph)
    finally:
        graph.reset()


def time_cpu_eager(fn: Callable[[], object], group, cfg: TimingConfig) -> float:
    """Median over ``cpu_repeats`` samples of the mean µs per eager call of ``fn`` on this rank, each sample
    ``calls_per_graph`` calls started after a barrier. Collective."""
    for _ in range(max(cfg.warmup, 1)):
        fn()
    samples = []
    for _ in range(cfg.cpu_repeats):
        _barrier(group)
        t0 = time.perf_counter()
        for _ in range(cfg.calls_per_graph):
            fn()
        samples.append((time.perf_counter() - t0) / cfg.calls_per_graph)
    return statistics.median(samples) * 1e6


def time_call(fn: Callable[[], object], device: torch.device, group, cfg: TimingConfig) -> float:
    """µs per call on this rank, by the method for ``device`` (see the module docstring). Collective."""
    if device.type == "cuda":
        return time_cuda_graph(fn, group, cfg)
    return time_cpu_eager(fn, group, cfg)


def max_over_ranks(value: float, group) -> Tuple[float, List[float]]:
    """(the slowest rank's value, every rank's value). Collective over the group's CPU side."""
    values = [float(v) for v in vote.all_gather_object(float(value), group)]
    return max(values), values
