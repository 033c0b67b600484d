"""``arfuse tune``: time arfuse's capable backends/variants over a token sweep and write the selection table.

Spawns one rank per GPU of each world size (under ``torchrun``: runs in the current world). Rank 0 writes the
table - ``--out``, else ``ARFUSE_TUNE_FILE``, else ``~/.cache/arfuse/tune.json`` - replacing only the entries of
the tuned shapes, and every rank reads it back. Run it while nothing else uses the GPUs.

``--from-bench JSON`` builds the entries from a committed ``arfuse bench --json`` result instead of timing;
with ``--write-defaults`` they go into the table shipped with arfuse (``arfuse/select/defaults.json``).
"""
from __future__ import annotations

import argparse
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
                   help="with --from-bench: write into arfuse's shipped defaults.json (default: --out)")


def run(args: argparse.Namespace) -> int:
    if args.write_defaults and not args.from_bench:
        raise UsageError("--write-defaults needs --from-bench JSON")
    if args.from_bench:
        return _from_bench(args)
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
    from arfuse.bench.report import validate
    from arfuse.bench.tuner import entries_from_measurements, write_entries
    from arfuse.select import build, table

    entries = []
    for name in args.from_bench:
        source = Path(name)
        try:
            doc = json.loads(source.read_text())
            measurements = validate(doc)
        except (OSError, ValueError) as e:
            raise UsageError(f"--from-bench {source}: {e}") from None
        date = doc.get("machine", {}).get("date", "")
        entries += entries_from_measurements(measurements, source=f"{source.name} {date}".strip())
    if not entries:
        print(f"arfuse tune: {', '.join(args.from_bench)}: no passing measurement of an arfuse backend",
              file=sys.stderr)
        return 1
    target = table.DEFAULTS_PATH if args.write_defaults else (Path(args.out) if args.out
                                                              else table.default_tune_path())
    write_entries(entries, target)
    _print_entries(build.to_json(table.Table(tuple(entries), str(target)))["entries"])
    print(f"arfuse tune: wrote {len(entries)} entries into {target}")
    return 0


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
