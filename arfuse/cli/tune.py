"""``arfuse tune``: time arfuse's capable backends/variants over a token sweep and write the selection table.

Spawns one rank per GPU of each world size (under ``torchrun``: runs in the current world). Rank 0 writes the
table - ``--out``, else ``ARFUSE_TUNE_FILE``, else ``~/.cache/arfuse/tune.json`` - replacing only the entries of
the tuned shapes, and every rank reads it back. Run it while nothing else uses the GPUs.

``--from-bench JSON`` builds the entries from a committed ``arfuse bench --json`` result instead of timing;
with ``--write-defaults`` they go into the table shipped with arfuse (``arfuse/select/defaults.json``).

The NCCL path's kernel launches per hidden size and token range (``arfuse.kernels.launch_table``): ``--epilogue``
sweeps them on this GPU (``arfuse bench --epilogue``'s sweep, without the torch.compile comparison) and writes the
per-machine launch table (``--launch-out``, else ``ARFUSE_LAUNCH_FILE``, else ``~/.cache/arfuse/launch.json``);
``--from-bench`` also takes ``arfuse bench --epilogue --json`` results, whose chosen launches go there too, or
with ``--write-defaults`` into ``arfuse/kernels/launch_table.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from arfuse.cli import args as args_
from arfuse.cli.args import UsageError
from arfuse.cli.bench import add_common, launch_each, resolve_device, sweep_config

TUNE_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=args_.sorted_int_list, default=TUNE_TOKENS,
                   help="token counts (default: 1,2,3,4,6,8,...,1536,2048)")
    add_common(p)
    p.add_argument("--out", default=None, metavar="PATH",
                   help="table file (default: ARFUSE_TUNE_FILE, else ~/.cache/arfuse/tune.json)")
    p.add_argument("--from-bench", nargs="+", default=None, metavar="JSON",
                   help="build the entries from bench JSON files (e.g. one per world size) instead of timing "
                        "(default: time)")
    p.add_argument("--write-defaults", action="store_true",
                   help="with --from-bench: write into arfuse's shipped tables, defaults.json and launch_table.json "
                        "(default: --out, --launch-out)")
    p.add_argument("--epilogue", action="store_true",
                   help="one GPU: sweep the nccl path's epilogue and MoE finalize launches per hidden size and token "
                        "range and write the launch table (honours --hidden, default 4096,5120,7168,8192; --tokens, "
                        "default 1,2,4,...,16384; --dtype, --warmup, --replays) (default: off)")
    p.add_argument("--launch-out", default=None, metavar="PATH",
                   help="launch table file for --epilogue or epilogue results in --from-bench (default: "
                        "ARFUSE_LAUNCH_FILE, else ~/.cache/arfuse/launch.json)")
    p.add_argument("--any-gpu", action="store_true",
                   help="with --from-bench: launch entries apply to any GPU and dtype, not only the measured ones "
                        "(default: the measured ones)")


def run(args: argparse.Namespace) -> int:
    if args.write_defaults and not args.from_bench:
        raise UsageError("--write-defaults needs --from-bench JSON")
    if args.any_gpu and not args.from_bench:
        raise UsageError("--any-gpu needs --from-bench JSON")
    if args.epilogue and args.from_bench:
        raise UsageError("--epilogue times here; --from-bench reads results: give one of them")
    if args.write_defaults and args.launch_out:
        raise UsageError("--launch-out and --write-defaults name two targets: give one of them")
    if args.launch_out:
        args_.check_writable("--launch-out", args.launch_out)
    if args.from_bench:
        return _from_bench(args)
    if args.epilogue:
        return _epilogue(args)
    from arfuse.bench.tuner import tune_rank
    from arfuse.select import table

    device = resolve_device(args)
    args_.check_writable("--out", args.out)
    out = Path(args.out) if args.out else table.default_tune_path()
    cfg = sweep_config(args, device, args.tokens, peers=False, auto=False)
    start = time.monotonic()
    results, error = launch_each(tune_rank, args, device, cfg, device, str(out))
    for path, entries, _ in results:
        _print_entries(entries)
    if error:
        print(f"arfuse tune: FAILED: {error}", file=sys.stderr)
        return 1
    if results:
        print(f"arfuse tune: wrote {out} in {time.monotonic() - start:.0f} s")
    return 0


def _from_bench(args: argparse.Namespace) -> int:
    from arfuse.bench.epilogue import FORMAT as EPILOGUE_FORMAT
    from arfuse.bench.launch_ranges import entries as launch_entries
    from arfuse.bench.report import validate
    from arfuse.bench.tuner import entries_from_measurements, write_entries
    from arfuse.select import build, table

    entries, launches = [], []
    for name in args.from_bench:
        source = Path(name)
        try:
            doc = json.loads(source.read_text())
            if isinstance(doc, dict) and doc.get("format") == EPILOGUE_FORMAT:
                launches += [dataclasses.replace(e, source=f"{source.name}: {e.source}")
                             for e in launch_entries(doc, anywhere=args.any_gpu)]
                continue
            measurements = validate(doc)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--from-bench {source}: {e}") from None
        date = doc.get("machine", {}).get("date", "")
        entries += entries_from_measurements(measurements, source=f"{source.name} {date}".strip())
    if not entries and not launches:
        print(f"arfuse tune: {', '.join(args.from_bench)}: no passing measurement of an arfuse backend",
              file=sys.stderr)
        return 1
    if entries:
        target = table.DEFAULTS_PATH if args.write_defaults else (Path(args.out) if args.out
                                                                  else table.default_tune_path())
        write_entries(entries, target)
        _print_entries(build.to_json(table.Table(tuple(entries), str(target)))["entries"])
        print(f"arfuse tune: wrote {len(entries)} entries into {target}")
    if launches:
        _write_launches(launches, args, defaults=args.write_defaults)
    return 0


def _epilogue(args: argparse.Namespace) -> int:
    """Sweep the nccl path's kernel launches on this GPU and write the per-machine launch table."""
    import torch

    from arfuse.bench import epilogue
    from arfuse.bench.launch_ranges import entries as launch_entries
    from arfuse.bench.timing import TimingConfig

    if not torch.cuda.is_available():
        raise UsageError("--epilogue: times GPU kernels and needs a CUDA device; none is visible here")
    if len(args.dtype) != 1:
        raise UsageError("--epilogue: one --dtype at a time")
    tokens = args.tokens if args.tokens != TUNE_TOKENS else epilogue.DEFAULT_TOKENS
    cfg = epilogue.EpilogueConfig(hidden=tuple(args.hidden or epilogue.DEFAULT_HIDDEN), tokens=tuple(tokens),
                                  dtype=getattr(torch, args.dtype[0]), kinds=(*epilogue.SWEEP_KINDS,
                                                                              epilogue.MOE_KIND),
                                  compare=False, timing=TimingConfig(calls_per_graph=20, warmup=args.warmup,
                                                                     replays=args.replays))
    start = time.monotonic()
    report = (lambda s: None) if args.no_progress else (lambda s: print(f"\r{s:<80}", end="", file=sys.stderr))
    doc = epilogue.run(cfg, "cuda", progress=report)
    if not args.no_progress:
        print(file=sys.stderr)
    for f in doc["failed"]:
        print(f"arfuse tune: FAILED {f['kind']} hidden {f['hidden']} launch {f['launch']}: {f['errors']} "
              f"(left out of the table)", file=sys.stderr)
    _write_launches(launch_entries(doc), args, defaults=False)
    print(f"arfuse tune: swept in {time.monotonic() - start:.0f} s")
    return 1 if doc["failed"] else 0


def _write_launches(entries, args: argparse.Namespace, defaults: bool) -> None:
    from arfuse.kernels import launch_table

    target = launch_table.DEFAULTS_PATH if defaults else (Path(args.launch_out) if args.launch_out
                                                          else launch_table.machine_path())
    try:
        existing = launch_table.load(target) if target.exists() else None
    except launch_table.LaunchTableError as e:
        if defaults:
            raise
        print(f"arfuse tune: replacing an unreadable launch table: {e}", file=sys.stderr)
        existing = None
    launch_table.save(launch_table.merged(existing, entries, str(target)), target)
    for e in entries:
        low, parts = 1, []
        for bound, launch in e.launches():
            parts.append(f"{low}-{bound}" if bound is not None else f"{low}+")
            parts[-1] += ": " + ", ".join(f"{k} {v}" for k, v in launch.items())
            low = (bound or 0) + 1
        print(f"  {e.kernel} {e.gpu or 'any GPU'} {e.dtype or 'any dtype'} hidden {e.hidden_size}: " + "; ".join(parts))
    print(f"arfuse tune: wrote {len(entries)} launch entries into {target}")


def _print_entries(entries) -> None:
    for e in entries:
        parts = []
        low = 1
        for r in e["ranges"]:
            high = r.get("max_tokens")
            span = f"{low}-{high}" if high is not None else f"{low}+"
            parts.append(f"{span}: {r['backend']}{'' if r['variant'] == 'default' else '/' + r['variant']}")
            low = (high or 0) + 1
        print(f"  {e['gpu']} TP{e['world_size']} hidden {e['hidden_size']} {e['dtype']}: " + "; ".join(parts))
