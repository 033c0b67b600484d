"""``arfuse bench``: every arfuse backend/variant, ``auto`` and the peers side by side, in one launch.

Each world size is a separate spawn of ranks on this host (under ``torchrun``: the current world only). Every
path is checked against the float64 reference before it is timed; a wrong one is reported FAILED, not timed.
Prints a latency table and a speed-up table per shape, and writes ``--json`` / ``--plot`` when asked. Exit code
1 if any path FAILED (the outputs are still written). torch is imported inside the functions: ``arfuse --help``
imports every command module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from arfuse.cli import args as args_, output
from arfuse.cli.args import UsageError

DEFAULT_TOKENS = tuple(1 << k for k in range(12))  # 1 .. 2048


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments ``bench`` and ``tune`` share."""
    p.add_argument("--hidden", type=args_.sorted_int_list, default=None,
                   help="comma-separated hidden sizes (default: 4096,8192 on GPU; 1024 on CPU)")
    args_.add_hidden_alias(p, "hidden", args_.sorted_int_list)
    p.add_argument("--dtype", type=args_.dtype_list, default=("bfloat16",),
                   help=f"comma-separated dtypes: {args_.DTYPE_HELP} (default: bfloat16)")
    p.add_argument("--world-sizes", type=args_.sorted_int_list, default=None,
                   help="world sizes, each a separate spawn (default: 2,4,.. up to the GPU count; 2 on CPU); "
                        "under torchrun only the current world")
    p.add_argument("--backends", type=args_.name_list, default=(),
                   help="only these paths: backend names, name/variant, auto, peer names or 'peers' (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda when GPUs are visible, else cpu (default: auto)")
    p.add_argument("--replays", type=args_.positive_int, default=20,
                   help="CUDA: timed replays of a graph of 10 calls (default: 20, the least the method allows)")
    p.add_argument("--warmup", type=args_.non_negative_int, default=3, help="warm-up replays or calls (default: 3)")
    p.add_argument("--cpu-repeats", type=args_.positive_int, default=15,
                   help="CPU: timed samples of 10 eager calls; the median is the figure, the interquartile range "
                        "the spread (default: 15)")
    p.add_argument("--seed", type=args_.non_negative_int, default=0, help="input seed (default: 0)")
    p.add_argument("--timeout", type=args_.positive_float, default=1800.0,
                   help="seconds allowed per spawn (default: 1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (default: shown)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=args_.sorted_int_list, default=DEFAULT_TOKENS,
                   help="comma-separated token counts (default: 1,2,4,...,2048)")
    add_common(p)
    p.add_argument("--table", default=None, metavar="PATH",
                   help="tuning table for auto (default: ARFUSE_TUNE_FILE, else ~/.cache/arfuse/tune.json)")
    p.add_argument("--no-peers", action="store_true", help="leave out the unfused peers (default: included)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every measurement as JSON (default: not "
                                                                "written)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write latency vs tokens as PNG; needs matplotlib, pip install 'arfuse[plot]' (default: "
                        "no plot)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: print the tables of a saved --json result (and --plot it) (default: "
                        "measure)")
    p.add_argument("--epilogue", action="store_true",
                   help="one GPU: the nccl path's epilogue (and MoE prologue) kernels per fusion kind vs "
                        "torch.compile, %% of HBM bandwidth, after sweeping their launches per token count (tokens "
                        "default 1..16384; "
                        "honours --hidden, --tokens, --dtype, --json, --warmup, --replays) (default: off)")
    p.add_argument("--kinds", type=args_.name_list, default=None,
                   help="with --epilogue: comma-separated kinds to time (the launch sweeps run only for the kinds "
                        "they sweep that are listed) (default: all)")
    p.add_argument("--launch-table", default=None, metavar="PATH",
                   help="with --epilogue: write the launches chosen per hidden size and token range as a launch "
                        "table (arfuse/kernels/launch_table.json's format) (default: only in --json)")
    p.add_argument("--host", action="store_true",
                   help="the host cost of one eager call per public op and spec kind, per backend that runs here, "
                        "next to the bare launch and the unfused torch; the triton_symm/flashinfer launch paths "
                        "timed on the CPU with the kernel stubbed (one --hidden/--tokens/--dtype, default 8192/8 on "
                        "GPU, 256/8 on CPU; world sizes default 1 on GPU, 1,2 on CPU; honours --backends, --json, "
                        "--warmup as tens of warm-up calls) (default: off)")
    p.add_argument("--calls", type=args_.positive_int, default=200,
                   help="--host: back-to-back calls per timed sample (default: 200)")
    p.add_argument("--samples", type=args_.positive_int, default=10,
                   help="--host: timed rounds; the figure is their median (default: 10)")
    p.add_argument("--profile", action="store_true",
                   help="--host: also where each call's microseconds go (cProfile, by part of the call) "
                        "(default: off)")


def check_paths(flag: str, requested, peers: bool, auto: bool) -> None:
    """UsageError unless every ``--backends`` filter names something the sweep can run (imports arfuse)."""
    from arfuse.bench.peers import BASELINE, ONE_SHOT, TWO_SHOT

    extra = (*BASELINE, ONE_SHOT, TWO_SHOT, "peers") if peers else ()
    listed, accepted = ([c for c in args_.backend_requests(listed_only) if auto or c != "auto"]
                        for listed_only in (True, False))
    args_.check_choices(flag, requested, (*listed, *extra), also=accepted)


def check_plot(path) -> None:
    """``--plot`` needs matplotlib: say so before measuring, not after."""
    import importlib.util

    if path and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'arfuse[plot]'")


def resolve_device(args: argparse.Namespace) -> str:
    return args_.resolve_device(args.device)


def world_sizes(args: argparse.Namespace, device: str) -> Tuple[int, ...]:
    import torch

    if args.world_sizes:
        return args.world_sizes
    if device == "cpu":
        return (2,)
    count = torch.cuda.device_count()
    return tuple(1 << k for k in range(1, count.bit_length()) if 1 << k <= count) or (1,)


def sweep_config(args: argparse.Namespace, device: str, tokens, peers: bool, auto: bool, table=None):
    """The sweep of ``bench`` or ``tune``, its flags checked (UsageError) before any rank is spawned."""
    from arfuse.bench.runner import SweepConfig
    from arfuse.bench.timing import TimingConfig
    from arfuse.launch import under_torchrun

    check_paths("--backends", args.backends, peers, auto)
    if not under_torchrun():
        for world in world_sizes(args, device):
            args_.check_ranks("--world-sizes", world, device)
    hidden = args.hidden or ((4096, 8192) if device == "cuda" else (1024,))
    timing = TimingConfig(warmup=args.warmup, replays=args.replays, cpu_repeats=args.cpu_repeats)
    return SweepConfig(tokens=tuple(tokens), hidden=tuple(hidden), dtypes=tuple(args.dtype),
                       only=tuple(args.backends), peers=peers, auto=auto, timing=timing, seed=args.seed,
                       table_path=table, progress=not args.no_progress)


def launch_each(fn, args: argparse.Namespace, device: str, *fn_args,
                on_result: Optional[Callable[[List], None]] = None) -> Tuple[List, Optional[str]]:
    """Run ``fn(rank, world, *fn_args)`` for every requested world size (or in the current torchrun world).

    Returns (rank 0's result per world size, the error that stopped the run or None). Under torchrun, ranks
    other than 0 get an empty list. ``on_result(results so far)`` runs after each world size, so a long run
    that is cut short still leaves its finished part behind.
    """
    from arfuse.launch import RankFailed, init_rank, run_ranks, under_torchrun

    if under_torchrun():
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.world_sizes and tuple(args.world_sizes) != (world,):
            raise UsageError(f"--world-sizes {','.join(map(str, args.world_sizes))}: under torchrun the world "
                             f"size is {world}")
        init_rank(rank, world, device)
        try:
            result = fn(rank, world, *fn_args)
        finally:
            dist.destroy_process_group()
        return ([result] if rank == 0 else []), None
    results: List = []
    for world in world_sizes(args, device):
        try:
            results.append(run_ranks(fn, world, *fn_args, device=device, timeout_s=args.timeout)[0])
        except (RankFailed, TimeoutError) as e:
            return results, f"TP{world}: {output.failure(e, getattr(args, 'verbose', False))}"
        if on_result is not None:
            on_result(results)
    return results, None


def bench_rank(rank: int, world: int, cfg, device: str) -> dict:
    """One rank of ``arfuse bench`` (process group initialised). Collective. Rank 0 adds the machine facts
    (so the launching process never initialises CUDA)."""
    from arfuse.bench.report import machine_info
    from arfuse.bench.runner import sweep

    result = sweep(cfg, None, device)
    if rank == 0:
        result["machine"] = machine_info()
    return result


def run(args: argparse.Namespace) -> int:
    from arfuse.bench import report
    from arfuse.select.table import default_tune_path

    check_plot(args.plot)
    args_.check_writable("--json", args.json)
    args_.check_writable("--plot", args.plot)
    if getattr(args, "kinds", None) is not None and not getattr(args, "epilogue", False):
        raise UsageError("--kinds applies to --epilogue only")
    if getattr(args, "launch_table", None) is not None and not getattr(args, "epilogue", False):
        raise UsageError("--launch-table applies to --epilogue only")
    args_.check_writable("--launch-table", getattr(args, "launch_table", None))
    if getattr(args, "epilogue", False):
        import torch

        from arfuse.bench.epilogue import KINDS, command

        unknown = [k for k in args.kinds or () if k not in KINDS]
        if unknown:
            raise UsageError(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
        if not torch.cuda.is_available():
            raise UsageError("--epilogue: times GPU kernels and needs a CUDA device; none is visible here")
        tokens = None if tuple(args.tokens) == DEFAULT_TOKENS else args.tokens
        return command(args.hidden, tokens, args.dtype[0], args.json, args.warmup, args.replays,
                       progress=not args.no_progress, kinds=args.kinds, table_path=args.launch_table)
    if getattr(args, "host", False):
        return run_host(args)
    if args.from_json:
        try:
            doc = json.loads(Path(args.from_json).read_text())
            report.validate(doc)
        except (OSError, ValueError) as e:
            raise UsageError(f"--from-json {args.from_json}: {e}") from None
        report.print_report(doc, output.console(220))
        write_outputs(doc, None, args.plot)
        return 0
    if args.table and not Path(args.table).is_file():
        raise UsageError(f"--table {args.table}: no such file (auto would silently use the defaults)")
    device = resolve_device(args)
    cfg = sweep_config(args, device, args.tokens, peers=not args.no_peers, auto=True, table=args.table)
    auto_table = Path(args.table) if args.table else default_tune_path()

    def make_doc(runs):
        config = {"tokens": list(cfg.tokens), "hidden": list(cfg.hidden), "dtypes": list(cfg.dtypes),
                  "world_sizes": sorted({s["world_size"] for r in runs for s in r["shapes"]}), "device": device,
                  "only": list(cfg.only), "timing_method": cfg.timing.method(device),
                  "pattern": "residual_rmsnorm", "seed": cfg.seed, "auto_table": str(auto_table),
                  "auto_table_found": auto_table.is_file()}
        return report.document(runs[0]["machine"], config, runs)

    def save_so_far(runs):
        write_outputs(make_doc(runs), args.json, None, quiet=True)

    runs, error = launch_each(bench_rank, args, device, cfg, device, on_result=save_so_far)
    if not runs:
        if error:
            print(f"arfuse bench: FAILED: {error}", file=sys.stderr)
            return 1
        return 0  # a torchrun rank other than 0: rank 0 reports
    doc = make_doc(runs)
    report.print_report(doc, output.console(220))
    write_outputs(doc, args.json, args.plot)
    if error:
        print(f"arfuse bench: stopped early: {error}", file=sys.stderr)
        return 1
    return 1 if any(m["status"] == "FAILED" for m in doc["measurements"]) else 0


def host_config(args: argparse.Namespace, device: str):
    """The ``--host`` run's configuration, its flags checked (UsageError) before anything is measured."""
    from arfuse.backends import base
    from arfuse.bench.host_cases import HostConfig

    for flag, values in (("--hidden", args.hidden), ("--tokens", None if tuple(args.tokens) == DEFAULT_TOKENS
                                                     else args.tokens), ("--dtype", args.dtype)):
        if values is not None and len(values) != 1:
            raise UsageError(f"{flag}: --host takes one value, got {','.join(map(str, values))}")
    names = [b.name for b in base.registered()]
    args_.check_choices("--backends", args.backends, names)
    hidden = args.hidden[0] if args.hidden else (8192 if device == "cuda" else 256)
    tokens = 8 if tuple(args.tokens) == DEFAULT_TOKENS else args.tokens[0]
    return HostConfig(hidden=hidden, tokens=tokens, dtype=args.dtype[0], calls=args.calls, samples=args.samples,
                      warmup=max(args.warmup, 1) * 10, backends=tuple(args.backends), profile=args.profile)


def run_host(args: argparse.Namespace) -> int:
    """``arfuse bench --host``: every world size (a spawn each; under torchrun the current world), then the
    stubbed launch paths on this process's CPU; the tables, and ``--json``."""
    from arfuse.bench import host, host_report
    from arfuse.bench.report import machine_info

    device = resolve_device(args)
    cfg = host_config(args, device)
    if not args.world_sizes:
        args.world_sizes = (1, 2) if device == "cpu" else (1,)
    from arfuse.launch import under_torchrun

    if not under_torchrun():
        for world in args.world_sizes:
            args_.check_ranks("--world-sizes", world, device)
    runs, error = launch_each(host.host_rank, args, device, cfg, device)
    if not runs and not error:
        return 0  # a torchrun rank other than 0: rank 0 reports
    stubbed = None
    try:
        import triton  # noqa: F401 - the stubbed launchers import the kernel modules

        from arfuse.bench.host_stubbed import stubbed_launchers

        stubbed = stubbed_launchers(cfg)
    except ImportError:
        print("arfuse bench --host: Triton is not installed: the stubbed launch paths are left out", file=sys.stderr)
    doc = host_report.document(machine_info(), cfg, device, runs, stubbed)
    host_report.print_report(doc, output.console(200))
    write_outputs(doc, args.json, None)
    if error:
        print(f"arfuse bench --host: stopped early: {error}", file=sys.stderr)
        return 1
    return 0


def write_outputs(doc: dict, json_path: Optional[str], plot_path: Optional[str], quiet: bool = False) -> None:
    from arfuse.bench.plot import plot

    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, allow_nan=False, default=_json_default) + "\n")
        if not quiet:
            print(f"arfuse bench: wrote {path}")
    if plot_path:
        print(f"arfuse bench: wrote {plot(doc, plot_path)}")


def _json_default(value):
    raise TypeError(f"arfuse bench: {type(value).__name__} is not JSON-serialisable: {value!r}")

