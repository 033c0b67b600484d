"""``arfuse demo``: run the fused ops over a sweep of token counts on every local rank and check each result.

With no GPU it spawns ``--ranks`` CPU processes (default 2) over gloo; with GPUs, one rank per GPU over NCCL;
under ``torchrun`` it joins that launch instead of spawning. Every output is written into a NaN-poisoned
tensor, compared with the float64 reference (:mod:`arfuse.verify`) on fresh random inputs per rank, and must be
bitwise identical on every rank (digests gathered to rank 0). Exit code 1 if any check fails. Progress (the
launch, then rank 0's pattern and size) goes to stderr; the table fits 80 columns.

torch is imported inside the functions: ``arfuse --help`` imports every command module.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from arfuse.cli import args as args_, output

SWEEP = (1, 3, 16, 64, 128, 257)
# demo name -> the FusionSpec's fields (arfuse.core.spec): each op and each kind of epilogue once
_UE8M0 = dict(quant=3, group_size=128, scale_layout=2)
PATTERNS = {"residual_rmsnorm": {}, "residual_rmsnorm_fp8": dict(quant=1), "rmsnorm": dict(residual=False),
            "all_reduce": dict(residual=False, norm=False), "gemma_norm": dict(weight_offset=True),
            "fp8_per_token": dict(quant=2, scale_layout=1, also_norm=True), "fp8_group_ue8m0": _UE8M0,
            "moe_finalize": dict(prologue=1, shared_expert=True), "moe_fp8_group": dict(prologue=1, **_UE8M0)}
HIDDEN_MULTIPLE = 128  # the group size of the FP8 group patterns
MAX_GPU_RANKS = 8
PROG = "arfuse demo"


@dataclass(frozen=True)
class DemoConfig:
    """What every rank runs; plain values so it pickles into spawned ranks."""

    device: str
    tokens: Tuple[int, ...]
    hidden: int
    dtype: str
    backend: str
    iters: int
    warmup: int = 3
    seed: int = 1234
    scale: float = 0.05
    progress: bool = True


@dataclass(frozen=True)
class RankRow:
    """One rank's result for one (tokens, pattern)."""

    tokens: int
    pattern: str
    path: str
    err_out: float
    err_residual: Optional[float]
    tolerance: float
    digest: str
    median_us: float
    problem: Optional[str] = None  # an output besides ``out`` and the residual out of tolerance


@dataclass(frozen=True)
class Row:
    """One table row: the ranks' results combined."""

    tokens: int
    pattern: str
    path: str
    err_out: float
    err_residual: Optional[float]
    median_us: float
    problem: Optional[str]  # None: every check passed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=args_.positive_int, default=None,
                   help=f"ranks to spawn (default: 2 on CPU, one per GPU up to {MAX_GPU_RANKS})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda when GPUs are visible, else cpu (default: auto)")
    p.add_argument("--backend", default="auto",
                   help="'auto', a backend name or 'name/variant'; arfuse doctor lists them (default: auto)")
    p.add_argument("--hidden", type=args_.positive_int, default=None,
                   help="hidden size (default: 1024 on CPU, 8192 on GPU)")
    args_.add_hidden_alias(p, "hidden", args_.positive_int)
    p.add_argument("--dtype", type=args_.dtype, default="bfloat16", help=f"{args_.DTYPE_HELP} (default: bfloat16)")
    p.add_argument("--tokens", type=args_.int_list, default=SWEEP,
                   help=f"comma-separated token counts (default: {','.join(map(str, SWEEP))})")
    p.add_argument("--iters", type=args_.positive_int, default=None,
                   help="timed calls per row (default: 20 on CPU, 100 on GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr (default: shown)")


def run(args: argparse.Namespace) -> int:
    import torch

    from arfuse.launch import RankFailed, run_ranks, under_torchrun

    device = args_.resolve_device(args.device)
    args_.check_backends("--backend", [args.backend])
    config = DemoConfig(device=device, tokens=tuple(args.tokens),
                        hidden=args.hidden or (8192 if device == "cuda" else 1024), dtype=args.dtype,
                        backend=args.backend, iters=args.iters or (100 if device == "cuda" else 20),
                        progress=not args.no_progress)
    if config.hidden % HIDDEN_MULTIPLE:
        raise args_.UsageError(f"--hidden: must be a multiple of {HIDDEN_MULTIPLE} (the FP8 group patterns' group "
                               f"size), got {config.hidden}")
    if under_torchrun():
        return _run_in_torchrun(config)
    ranks = args.ranks or (min(torch.cuda.device_count(), MAX_GPU_RANKS) if device == "cuda" else 2)
    args_.check_ranks("--ranks", ranks, device)
    if config.progress:
        output.status(PROG, f"starting {ranks} {device} ranks ({'NCCL' if device == 'cuda' else 'gloo'}) ...")
    try:
        result = run_ranks(demo_rank, ranks, config, device=device)[0]
    except (RankFailed, TimeoutError) as e:
        print(f"{PROG}: FAILED: {output.failure(e, getattr(args, 'verbose', False))}", file=sys.stderr)
        return 1
    return _report(config, ranks, *result)


def _run_in_torchrun(config: DemoConfig) -> int:
    import torch.distributed as dist

    from arfuse.launch import init_rank

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_rank(rank, world, config.device)
    try:
        result = demo_rank(rank, world, config)
    finally:
        dist.destroy_process_group()
    return _report(config, world, *result) if rank == 0 else _exit_code(result[0], result[2])


def demo_rank(rank: int, world_size: int, config: DemoConfig):
    """One rank's share of the demo (the default process group is initialised). Collective.

    Returns ``(rows, stats, stats_agree)``, combined over all ranks, on every rank.
    """
    import torch
    import torch.distributed as dist

    from arfuse import AllReduceFusion

    dtype = getattr(torch, config.dtype)
    device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else torch.device("cpu")
    mine: List[RankRow] = []
    bar = output.progress(len(config.tokens) * len(PATTERNS), f"rank 0 of {world_size}: constructing",
                          enabled=config.progress and rank == 0, unit="check")
    with bar, AllReduceFusion(max_tokens=max(config.tokens), hidden_size=config.hidden, dtype=dtype,
                              device=device, backend=config.backend) as fusion:
        for i, tokens in enumerate(config.tokens):
            for j, pattern in enumerate(PATTERNS):
                bar.set_description(f"rank 0 of {world_size}: {pattern}, {tokens} tokens")
                mine.append(_check_one(fusion, config, tokens, pattern, config.seed + 97 * i + j, rank, world_size))
                bar.update(1)
        stats = fusion.stats()
    gathered: List[Tuple[List[RankRow], dict]] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, (mine, dict(stats)))
    rows = [_combine([g[0][k] for g in gathered]) for k in range(len(mine))]
    return rows, stats, all(g[1] == dict(stats) for g in gathered)


def _check_one(fusion, config: DemoConfig, tokens: int, pattern: str, seed: int, rank: int,
               world_size: int) -> RankRow:
    from arfuse.core.spec import FusionSpec
    from arfuse.verify import Case, digest, output_errors, poisoned_outputs, run_spec, spec_inputs

    import torch

    spec = FusionSpec(**PATTERNS[pattern])
    device = fusion.capacity.device
    case = Case(tokens, config.hidden, getattr(torch, config.dtype), seed, scale=config.scale,
                weight_offset=1.0 if spec.weight_offset else 0.0)
    outputs = poisoned_outputs(spec, case, device)
    # inputs made once: the timing below is of the op alone (the residual output is written, not the residual)
    call = functools.partial(run_spec, fusion, spec, case, spec_inputs(spec, case, rank, device), outputs)

    before = fusion.stats()["calls"]
    got = call()
    after = fusion.stats()["calls"]
    path = ",".join(k for k in sorted(after) if after[k] != before.get(k, 0)) or "none"

    errors = output_errors(spec, case, world_size, got)
    err_out, tol = errors.pop("out")
    err_res = errors.get("residual_out", (None, tol))[0]
    others = [f"{k} error {e:.2e} > {t:g}" for k, (e, t) in errors.items() if not e <= t]
    return RankRow(tokens, pattern, path, err_out, err_res, tol, digest(*got.values()),
                   _median_us(call, config, device), others[0] if others else None)


def _median_us(call, config: DemoConfig, device) -> float:
    """Median of ``config.iters`` eager calls (CUDA events on GPU), after warm-up and a barrier."""
    import torch
    import torch.distributed as dist

    for _ in range(config.warmup):
        call()
    dist.barrier()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(config.iters)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) * 1e3 for start, end in events]
    else:
        for _ in range(config.iters):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _combine(per_rank: Sequence[RankRow]) -> Row:
    """Merge one row across ranks: worst error, slowest median, and the first failed check if any."""
    first = per_rank[0]
    err_out = max(r.err_out for r in per_rank)
    residuals = [r.err_residual for r in per_rank if r.err_residual is not None]
    err_res = max(residuals) if residuals else None
    problem = None
    if len({r.path for r in per_rank}) > 1:
        problem = "ranks ran different paths"
    elif first.path == "none":
        problem = "no call was counted"
    elif err_out > first.tolerance:
        problem = f"output error > {first.tolerance:g}"
    elif err_res is not None and err_res > first.tolerance:
        problem = f"residual error > {first.tolerance:g}"
    elif any(r.problem for r in per_rank):
        problem = next(r.problem for r in per_rank if r.problem)
    elif len({r.digest for r in per_rank}) > 1:
        problem = "outputs differ across ranks"
    return Row(first.tokens, first.pattern, first.path, err_out, err_res, max(r.median_us for r in per_rank),
               problem)


def _exit_code(rows: Sequence[Row], stats_agree: bool) -> int:
    return 1 if any(r.problem for r in rows) or not stats_agree else 0


def _report(config: DemoConfig, ranks: int, rows: Sequence[Row], stats, stats_agree: bool) -> int:
    from rich import box
    from rich.table import Table

    console = output.console()
    fabric = "NCCL" if config.device == "cuda" else "gloo"
    table = Table(title=f"arfuse demo: {ranks} ranks ({config.device}, {fabric}), hidden {config.hidden}, "
                        f"{config.dtype}, backend {config.backend}",
                  caption=f"err: ||out - ref|| / ||ref|| against float64, worst rank; "
                          f"µs: median of {config.iters} eager calls, slowest rank",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # Fits 80 columns with the pattern names whole (residual_rmsnorm vs residual_rmsnorm_fp8); a long path name
    # (triton_symm/lamport_two_shot) or failure reason folds onto a second line instead.
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("pattern", no_wrap=True, min_width=max(map(len, PATTERNS)))
    table.add_column("path", overflow="fold")
    for name in ("err out", "err res", "µs"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")
    for r in rows:
        table.add_row(str(r.tokens), r.pattern, r.path, f"{r.err_out:.1e}",
                      "-" if r.err_residual is None else f"{r.err_residual:.1e}",
                      f"{r.median_us:.1f}" if r.median_us < 100 else f"{r.median_us:.0f}",
                      "[green]ok[/green]" if r.problem is None else f"[red]FAIL: {r.problem}[/red]")
    console.print(table)
    console.print(str(stats), markup=False, highlight=False)
    if not stats_agree:
        console.print("[red]FAIL: the ranks' path counters differ[/red]")
    if _exit_code(rows, stats_agree):
        failed = sum(r.problem is not None for r in rows)
        console.print(f"[red]{failed} of {len(rows)} checks FAILED[/red]")
        return 1
    console.print(f"[green]all {len(rows)} checks passed[/green]")
    return 0
