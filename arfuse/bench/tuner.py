"""``arfuse tune``: time arfuse's capable paths for given shapes and write the selection table they imply.

The sweep is :mod:`arfuse.bench.runner` without the peers and ``auto`` (a table can only name arfuse's own
paths). Every rank gets the same slowest-rank timings, so every rank builds the same entries; rank 0 merges them
into the table file (replacing only entries of the same key) and writes it atomically, then every rank reads the
file back and checks it holds exactly those entries - proof that all ranks read the same table.
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch.distributed as dist

from arfuse.bench import runner
from arfuse.core.counters import log_once
from arfuse.probe import vote
from arfuse.select import build, table as tables

def entries_from_measurements(measurements: Sequence[dict], source: str) -> List[tables.Entry]:
    """Selection-table entries from bench/tune measurements: one per (GPU, world size, dtype, hidden)."""
    entries = []
    for (gpu, world, dtype, hidden), timings in sorted(build.timings_by_shape(measurements).items(),
                                                       key=lambda kv: tuple(map(str, kv[0]))):
        entries.append(build.entry_from_timings(timings, gpu=gpu, world_size=world, dtype=dtype,
                                                hidden_size=hidden, source=source))
    return entries


def existing_table(path: Path) -> tables.Table:
    """The table already at ``path`` (empty if none; a malformed one is reported and replaced)."""
    if not path.exists():
        return tables.Table(entries=(), source=str(path))
    try:
        return tables.load(path)
    except tables.TableError as e:
        log_once(f"tune-replace:{path}", f"arfuse tune: replacing an unreadable table: {e}", logging.WARNING)
        return tables.Table(entries=(), source=str(path))


def write_entries(entries: Sequence[tables.Entry], path: Path) -> tables.Table:
    """Merge ``entries`` into the table at ``path`` and write it. Not collective (one process writes)."""
    merged = build.merged(existing_table(path), entries, str(path))
    build.save(merged, path)
    return merged


def tune_rank(rank: int, world_size: int, cfg: runner.SweepConfig, device_type: str,
              out_path: str) -> Tuple[str, List[dict], Dict[str, list]]:
    """One rank's share of ``arfuse tune`` (process group initialised). Collective.

    Returns ``(path, entries as JSON, sweep result)``; raises RuntimeError if no path passed its check or if
    the file read back differs from what this rank computed.
    """
    result = runner.sweep(cfg, None, device_type)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries = entries_from_measurements(result["measurements"], source=f"arfuse tune {stamp}")
    if not entries:
        failed = sorted({f"{m['path']}: {m['reason']}" for m in result["measurements"] if m["status"] == "FAILED"})
        if failed:
            raise RuntimeError(f"arfuse tune: no path passed its check; nothing to write ({'; '.join(failed[:3])})")
        cannot = "; ".join(sorted({f"{m['path']}: {m['reason']}" for m in result["measurements"]})[:3])
        raise RuntimeError(f"arfuse tune: no path can run here; nothing to write ({cannot or 'no path selected'})")
    path = Path(out_path)
    why = None
    if rank == 0:
        try:
            write_entries(entries, path)
        except OSError as e:
            why = f"cannot write {path}: {e}"
    ok, reason = vote.agree(why is None, why, None)
    if not ok:
        raise RuntimeError(f"arfuse tune: {reason}")
    if vote.is_distributed():
        dist.barrier()
    read_back = {e.key: e for e in tables.load(path).entries}
    if any(read_back.get(e.key) != e for e in entries):
        raise RuntimeError(f"arfuse tune: rank {rank} read back {path} without the entries it tuned")
    doc = build.to_json(tables.Table(tuple(entries), str(path)))["entries"]
    return str(path), doc, result
