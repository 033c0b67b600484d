"""Where a model step's device time goes: the kernels one call runs, summed by category.

:func:`kernel_times` profiles a warmed-up callable with ``torch.profiler`` and returns one (name, µs) pair per
kernel it ran (on CPU, per operator's own time instead, so the same code runs in CI); :func:`breakdown` sums
them by :data:`CATEGORIES`. Comparing the kernels' sum with the step's wall time shows how much is launch gaps.

>>> b = breakdown([("nvjet_tst_128x8_64x12_2x1_v_bz_TNT", 40.0), ("triton_poi_fused_mul_silu_0", 2.5),
...                ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 12.0)])
>>> b["categories"]["gemm"]["us"], b["categories"]["comm"]["count"], b["kernels"]
(40.0, 1, 3)
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Sequence, Tuple

import torch

# First match wins: arfuse's own Triton kernels and NCCL's count as communication before the generic "triton",
# and cutlass attention kernels as attention before gemm.
_PATTERNS = (
    ("comm", r"nccl|all_?reduce|all_?gather|lamport|one_shot|two_shot|trtllm|symm|multimem"),
    ("attn", r"fmha|flash|attention|attn|sdpa|softmax"),
    ("gemm", r"gemm|gemv|nvjet|xmma|cublas|cutlass|splitk|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("norm", r"rms_?norm|layer_?norm"),
    ("compiled", r"^triton_|^triton"),
    ("copy", r"copy|index|cat|embedding|gather|scatter|fill|where|clone|contiguous"),
    ("pointwise", r"elementwise|vectorized|reduce|unrolled|aten::"),
)
CATEGORIES: Tuple[Tuple[str, "re.Pattern[str]"], ...] = tuple((label, re.compile(pattern, re.IGNORECASE))
                                                              for label, pattern in _PATTERNS)
OTHER = "other"


def category(name: str) -> str:
    """The :data:`CATEGORIES` name of a kernel (or CPU operator) called ``name``, or ``"other"``."""
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return OTHER


def breakdown(kernels: Sequence[Tuple[str, float]], top: int = 12) -> dict:
    """Sum (name, µs) pairs by category; also the ``top`` kernels by total time."""
    cats: Dict[str, dict] = {label: {"count": 0, "us": 0.0} for label, _ in CATEGORIES}
    cats[OTHER] = {"count": 0, "us": 0.0}
    by_name: Dict[str, List[float]] = {}
    for name, us in kernels:
        cell = cats[category(name)]
        cell["count"] += 1
        cell["us"] += us
        by_name.setdefault(name, []).append(us)
    heaviest = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"kernels": len(kernels), "us": sum(us for _, us in kernels), "categories": cats,
            "top": [{"name": n[:120], "category": category(n), "count": len(v), "us": sum(v)} for n, v in heaviest]}


def kernel_times(run: Callable[[], object], device: torch.device) -> List[Tuple[str, float]]:
    """(name, µs) of every kernel ``run()`` launches on ``device`` (CUDA), or of every operator's own time,
    without its children's (CPU).
    Warm ``run`` up first: compilation and first-call work would be profiled too."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()]
