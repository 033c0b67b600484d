"""How ``arfuse bench --host`` times a case's calls: ``calls`` back-to-back calls with the same inputs, timed with
``perf_counter_ns`` around the Python loop, the calls of a case timed in turn in each of ``samples`` rounds (so
drift on a shared host hits them alike). On CUDA the stream runs ahead and is synchronised only after each loop,
outside the timed part: the figure is the host's time per call, not the kernels'."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from arfuse.bench.host_cases import HostConfig
from arfuse.bench.timing import quartiles


def time_rounds(fns: Dict[str, Callable], cfg: HostConfig, device: torch.device, group, world: int
                ) -> Dict[str, List[float]]:
    """µs per call of each function, one sample per round (see the module docstring). Collective."""
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(cfg.warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(cfg.samples):
        for name, fn in fns.items():
            if world > 1:
                dist.barrier(group=group)
            t0 = time.perf_counter_ns()
            for _ in range(cfg.calls):
                fn()
            t1 = time.perf_counter_ns()
            if cuda:
                torch.cuda.synchronize()  # outside the timed part: the stream ran ahead of the host
            samples[name].append((t1 - t0) / cfg.calls / 1e3)
    return samples


def summarize(samples: Dict[str, List[float]], reference: str = "bare") -> Dict[str, dict]:
    """Per function: the median (``us``), the minimum and the quartiles of its rounds, and the median of the
    per-round differences from ``reference`` (``over_<reference>_us``) where there is one."""
    out = {}
    for name, values in samples.items():
        entry = {"us": statistics.median(values), "min_us": min(values), "q1_q3": list(quartiles(values))}
        if reference in samples and name != reference:
            entry[f"over_{reference}_us"] = statistics.median(a - b for a, b in zip(values, samples[reference]))
        out[name] = entry
    return out
