"""Tables and the target check for ``arfuse bench --epilogue`` documents (:mod:`arfuse.bench.epilogue`).

Targets (issue 21): every kind's kernel never slower than ``torch.compile`` of the same math at any size, and at
>= 90% of the measured copy bandwidth from 2048 tokens up.
"""
from __future__ import annotations

from typing import Dict, List, Optional

HBM_TARGET_PCT = 90.0
HBM_TARGET_FROM_TOKENS = 2048
COMPILED = "torch.compile"
PATHS = ("arfuse/default", "arfuse/tuned")


def _by_point(doc: dict) -> Dict[tuple, Dict[str, dict]]:
    points: Dict[tuple, Dict[str, dict]] = {}
    for m in doc["measurements"]:
        points.setdefault((m["hidden"], m["kind"], m["tokens"]), {})[m["path"]] = m
    return points


def summary(doc: dict, path: str = "arfuse/default") -> List[dict]:
    """Per (hidden, kind) measured with ``path``: the least %HBM from 2048 tokens up, the least speed-up over
    torch.compile (compiled µs / ours), where each is reached, and whether both targets hold."""
    rows: Dict[tuple, dict] = {}
    for (hidden, kind, tokens), paths in sorted(_by_point(doc).items()):
        ours, compiled = paths.get(path), paths.get(COMPILED)
        if ours is None:
            continue
        row = rows.setdefault((hidden, kind), {"hidden": hidden, "kind": kind, "path": path, "min_pct_hbm": None,
                                               "at_tokens": None, "min_speedup": None, "speedup_at": None})
        if tokens >= HBM_TARGET_FROM_TOKENS and (row["min_pct_hbm"] is None or ours["pct_hbm"] < row["min_pct_hbm"]):
            row["min_pct_hbm"], row["at_tokens"] = ours["pct_hbm"], tokens
        if compiled is not None:
            speedup = compiled["us"] / ours["us"]
            if row["min_speedup"] is None or speedup < row["min_speedup"]:
                row["min_speedup"], row["speedup_at"] = speedup, tokens
    for row in rows.values():
        row["meets_targets"] = ((row["min_pct_hbm"] is None or row["min_pct_hbm"] >= HBM_TARGET_PCT)
                                and (row["min_speedup"] is None or row["min_speedup"] >= 1.0))
    return list(rows.values())


def ranges_text(ranges: List[list]) -> str:
    """``[[max_tokens, launch], ...]`` as ``1-64: (1, 8, 528, False); 65+: ...``."""
    low, parts = 1, []
    for bound, launch in ranges:
        parts.append(f"{low}-{bound}: {tuple(launch)}" if bound is not None else f"{low}+: {tuple(launch)}")
        low = (bound or 0) + 1
    return "; ".join(parts)


def _cell(ours: Optional[dict], compiled: Optional[dict]) -> str:
    if ours is None:
        return "-"
    text = f"{ours['us']:.1f} µs {ours['pct_hbm']:.0f}%"
    if compiled is not None:
        speedup = compiled["us"] / ours["us"]
        text += f" {'[red]' if speedup < 1 else ''}{speedup:.2f}x{'[/]' if speedup < 1 else ''}"
    return text


def _launch_tables(doc: dict, console) -> None:
    """Per hidden size, every swept MoE finalize launch's µs at each token count next to torch.compile's, and the
    fastest one's speed-up over torch.compile and over the row launch with one slot per step (the kernel's load
    order before 2026-12)."""
    from rich.table import Table

    sweep = [m for m in doc.get("sweep", []) if m.get("kernel") == "moe_finalize"]
    points = _by_point(doc)
    for hidden in doc["config"]["hidden"]:
        records = [m for m in sweep if m["hidden"] == hidden]
        if not records:
            continue
        launches = list(dict.fromkeys(tuple(m["launch"]) for m in records))
        widest = max(launch[0] for launch in launches)
        before = next((launch for launch in launches if launch[0] == widest and launch[3] == 1), None)
        table = Table(title=f"MoE finalize launches, hidden {hidden}: µs per (block_h, warps, max CTAs, slots); the "
                            f"fastest's speed-up over torch.compile and over {before} (one slot per step)")
        table.add_column("tokens", justify="right")
        for launch in launches:
            table.add_column(str(launch), justify="right")
        for col in (COMPILED, "fastest vs compile", "vs one slot"):
            table.add_column(col, justify="right")
        for tokens in sorted({m["tokens"] for m in records}):
            us = {tuple(m["launch"]): m["us"] for m in records if m["tokens"] == tokens}
            compiled = points.get((hidden, records[0]["kind"], tokens), {}).get(COMPILED)
            best = min(us.values())
            cells = [("-" if launch not in us else f"[bold]{us[launch]:.1f}[/]" if us[launch] == best
                      else f"{us[launch]:.1f}") for launch in launches]
            table.add_row(str(tokens), *cells, f"{compiled['us']:.1f}" if compiled else "-",
                          f"{compiled['us'] / best:.2f}x" if compiled else "-",
                          f"{us[before] / best:.2f}x" if before in us else "-")
        console.print(table)


def print_report(doc: dict, console=None) -> None:
    """One table per hidden size (tokens x kinds: µs, % of HBM, speed-up over torch.compile, with the tuned
    launches where there are some), the MoE finalize launches, the chosen launch ranges and the target check."""
    import os

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if os.isatty(1) else 240)
    points = _by_point(doc)
    kinds = list(doc["config"]["kinds"])
    ranges = doc.get("ranges", {})
    copies = ", ".join(f"{k} {v:.0f}" for k, v in doc.get("copies_gbps", {}).items())
    nominal = f"; nominal {doc['nominal_gbps']:.0f}" if doc.get("nominal_gbps") else ""
    console.print(f"HBM copy bandwidth measured: {doc['hbm_gbps']:.0f} GB/s (the 100%: the faster of {copies or 'a copy'}"
                  f"{nominal})  [dim]({doc['config']['timing']})[/]")
    for hidden in doc["config"]["hidden"]:
        if not any(h == hidden for h, _, _ in points):
            continue
        table = Table(title=f"nccl-path kernels, hidden {hidden}, {doc['config']['dtype']}: µs, % of HBM, speed-up over "
                            f"torch.compile (tuned launches where swept, else the current table's)")
        table.add_column("tokens", justify="right")
        for kind in kinds:
            table.add_column(kind, justify="right")
        for tokens in doc["config"]["tokens"]:
            cells = []
            for kind in kinds:
                paths = points.get((hidden, kind, tokens), {})
                cells.append(_cell(paths.get("arfuse/tuned") or paths.get("arfuse/default"), paths.get(COMPILED)))
            table.add_row(str(tokens), *cells)
        console.print(table)
    _launch_tables(doc, console)
    table = Table(title=f"targets: never slower than torch.compile, >= {HBM_TARGET_PCT:.0f}% of the measured copy "
                        f"bandwidth from {HBM_TARGET_FROM_TOKENS} tokens")
    for col in ("hidden", "kind", "launch", "min % HBM (tokens)", "min speed-up (tokens)", "met"):
        table.add_column(col)
    for path in PATHS:
        for row in summary(doc, path):
            table.add_row(str(row["hidden"]), row["kind"], path.split("/")[1],
                          "-" if row["min_pct_hbm"] is None else f"{row['min_pct_hbm']:.0f} ({row['at_tokens']})",
                          "-" if row["min_speedup"] is None else f"{row['min_speedup']:.2f} ({row['speedup_at']})",
                          "yes" if row["meets_targets"] else "[red]no[/]")
    console.print(table)
    fields = {"epilogue": "rows, num_warps, max CTAs, evict_first", "moe_finalize": "block_h, num_warps, max CTAs, slots"}
    for kernel, by_hidden in sorted(ranges.items()):
        for hidden, found in sorted(by_hidden.items(), key=lambda kv: int(kv[0])):
            console.print(f"tuned {kernel} launches, hidden {hidden} ({fields[kernel]}): {ranges_text(found)}")
    if ranges:
        console.print("[dim]the document's launch_table holds them; arfuse tune --from-bench JSON writes them "
                      "(--write-defaults: into arfuse/kernels/launch_table.json)[/]")
    for f in doc["failed"]:
        console.print(f"[bold red]FAILED[/] {f['kind']} hidden {f['hidden']} launch {f['launch']}: {f['errors']}")
