"""Time one collective call the same way for every path (the project's performance method).

CUDA: warm up eagerly on a side stream, capture ``calls_per_graph`` calls in one CUDA graph, replay it
``warmup`` times, ``dist.barrier()`` so the ranks start together, then time ``replays`` replays with CUDA events;
the result is the mean per call, and :func:`worst_over_ranks` takes the slowest rank. CPU: eager wall-clock, the
median of ``cpu_repeats`` samples of ``calls_per_graph`` calls, each sample after a barrier, with the samples'
interquartile range as the spread - a different method, labelled as such, never compared with GPU figures, and
indicative only (the ranks share the host's cores with each other and with everything else running).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from arfuse.probe import vote


@dataclass(frozen=True)
class TimingConfig:
    """How many calls to time: on CUDA at least 20 timed replays of a graph of 10 calls after 3 warm-up replays
    (the project's method); on CPU the median of 15 samples, as CPU timings are noisy."""

    calls_per_graph: int = 10
    warmup: int = 3
    replays: int = 20
    cpu_repeats: int = 15

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
        return (f"cpu-eager: wall-clock median of {self.cpu_repeats} samples of {self.calls_per_graph} calls "
                f"(spread: their interquartile range), max over ranks; indicative only, not comparable to GPU")


@dataclass(frozen=True)
class Measured:
    """One path's time per call on one rank: ``us`` (CUDA: the mean over the replays; CPU: the median sample)
    and, on CPU, ``spread`` = (25th, 75th percentile) of the samples (None on CUDA: one timed block)."""

    us: float
    spread: Optional[Tuple[float, float]] = None


def quartiles(samples: Sequence[float]) -> Tuple[float, float]:
    """(25th, 75th percentile) of ``samples``, interpolated; both the value itself for a single sample.

    >>> quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    (2.0, 4.0)
    """
    if len(samples) < 2:
        return float(samples[0]), float(samples[0])
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


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


def time_cpu_eager(fn: Callable[[], object], group, cfg: TimingConfig) -> Measured:
    """Median (and interquartile range) over ``cpu_repeats`` samples of the mean µs per eager call of ``fn`` on
    this rank, each sample ``calls_per_graph`` calls started after a barrier. Collective."""
    for _ in range(max(cfg.warmup, 1)):
        fn()
    samples = []
    for _ in range(cfg.cpu_repeats):
        _barrier(group)
        t0 = time.perf_counter()
        for _ in range(cfg.calls_per_graph):
            fn()
        samples.append((time.perf_counter() - t0) / cfg.calls_per_graph * 1e6)
    return Measured(statistics.median(samples), quartiles(samples))


def time_call(fn: Callable[[], object], device: torch.device, group, cfg: TimingConfig) -> Measured:
    """µs per call on this rank, by the method for ``device`` (see the module docstring). Collective."""
    if device.type == "cuda":
        return Measured(time_cuda_graph(fn, group, cfg))
    return time_cpu_eager(fn, group, cfg)


def worst_over_ranks(measured: Measured, group) -> Tuple[Measured, List[float]]:
    """(the slowest rank's figure, each bound of the spread the largest over the ranks; every rank's figure).
    Collective over the group's CPU side."""
    every = vote.all_gather_object((float(measured.us), measured.spread), group)
    spreads = [s for _, s in every if s is not None]
    spread = (max(s[0] for s in spreads), max(s[1] for s in spreads)) if len(spreads) == len(every) else None
    return Measured(max(u for u, _ in every), spread), [u for u, _ in every]
