"""Tables and the target check for ``arfuse bench --epilogue`` documents (:mod:`arfuse.bench.epilogue`).

Targets (issue 13): every kind's kernel at >= 85% of the measured HBM bandwidth from 1024 tokens up, and never
slower than ``torch.compile`` of the same math at any size.
"""
from __future__ import annotations

from typing import Dict, List, Optional

HBM_TARGET_PCT = 85.0
HBM_TARGET_FROM_TOKENS = 1024
COMPILED = "torch.compile"


def _by_point(doc: dict) -> Dict[tuple, Dict[str, dict]]:
    points: Dict[tuple, Dict[str, dict]] = {}
    for m in doc["measurements"]:
        points.setdefault((m["hidden"], m["kind"], m["tokens"]), {})[m["path"]] = m
    return points


def summary(doc: dict, path: str = "arfuse/default") -> List[dict]:
    """Per (hidden, kind): the least %HBM from 1024 tokens up, the least speed-up over torch.compile (compiled µs /
    ours), where each is reached, and whether both targets hold, for ``path`` (or the default where a kind has no
    such path, e.g. the MoE prologue's recommended launch)."""
    rows: Dict[tuple, dict] = {}
    for (hidden, kind, tokens), paths in sorted(_by_point(doc).items()):
        ours = paths.get(path) or paths.get("arfuse/default")
        compiled = paths.get(COMPILED)
        if ours is None:
            continue
        row = rows.setdefault((hidden, kind), {"hidden": hidden, "kind": kind, "path": ours["path"],
                                               "min_pct_hbm": None, "at_tokens": None, "min_speedup": None,
                                               "speedup_at": None})
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


def _cell(ours: Optional[dict], compiled: Optional[dict]) -> str:
    if ours is None:
        return "-"
    text = f"{ours['us']:.1f} µs {ours['pct_hbm']:.0f}%"
    if compiled is not None:
        speedup = compiled["us"] / ours["us"]
        text += f" {'[red]' if speedup < 1 else ''}{speedup:.2f}x{'[/]' if speedup < 1 else ''}"
    return text


def print_report(doc: dict, console=None) -> None:
    """One table per hidden size (tokens x kinds: µs, % of HBM, speed-up over torch.compile, for the recommended
    launch where there is one), the sweep's recommendation and the target check."""
    import os

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if os.isatty(1) else 240)
    points = _by_point(doc)
    kinds = list(doc["config"]["kinds"])
    copies = ", ".join(f"{k} {v:.0f}" for k, v in doc.get("copies_gbps", {}).items())
    nominal = f"; nominal {doc['nominal_gbps']:.0f}" if doc.get("nominal_gbps") else ""
    console.print(f"HBM copy bandwidth measured: {doc['hbm_gbps']:.0f} GB/s (the 100%: the faster of {copies or 'a copy'}"
                  f"{nominal})  [dim]({doc['config']['timing']})[/]")
    for hidden in doc["config"]["hidden"]:
        rec = doc["recommended"].get(str(hidden))
        table = Table(title=f"epilogue kernels, hidden {hidden}, {doc['config']['dtype']}: µs, % of HBM, speed-up "
                            f"over torch.compile  (recommended launch {rec['launch'] if rec else '-'})")
        table.add_column("tokens", justify="right")
        for kind in kinds:
            table.add_column(kind, justify="right")
        for tokens in doc["config"]["tokens"]:
            cells = []
            for kind in kinds:
                paths = points.get((hidden, kind, tokens), {})
                cells.append(_cell(paths.get("arfuse/recommended") or paths.get("arfuse/default"),
                                   paths.get(COMPILED)))
            table.add_row(str(tokens), *cells)
        console.print(table)
    table = Table(title=f"targets: >= {HBM_TARGET_PCT:.0f}% of HBM from {HBM_TARGET_FROM_TOKENS} tokens, never slower "
                        f"than torch.compile")
    for col in ("hidden", "kind", "launch", "min % HBM (tokens)", "min speed-up (tokens)", "met"):
        table.add_column(col)
    for path in ("arfuse/default", "arfuse/recommended"):
        for row in summary(doc, path):
            if row["path"] != path:
                continue
            table.add_row(str(row["hidden"]), row["kind"], path.split("/")[1],
                          "-" if row["min_pct_hbm"] is None else f"{row['min_pct_hbm']:.0f} ({row['at_tokens']})",
                          "-" if row["min_speedup"] is None else f"{row['min_speedup']:.2f} ({row['speedup_at']})",
                          "yes" if row["meets_targets"] else "[red]no[/]")
    console.print(table)
    if doc["recommended"]:
        launches = {int(h): tuple(r["launch"]) for h, r in doc["recommended"].items()}
        console.print(f"launch_config.EPILOGUE_LAUNCH = {launches}  (rows, num_warps, max CTAs; worst ratio to the "
                      f"best swept launch: " + ", ".join(f"{h}: {r['worst_ratio']:.2f}"
                                                         for h, r in doc["recommended"].items()) + ")")
    for f in doc["failed"]:
        console.print(f"[bold red]FAILED[/] {f['kind']} hidden {f['hidden']} launch {f['launch']}: {f['errors']}")
