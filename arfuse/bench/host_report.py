"""The ``arfuse bench --host`` document (JSON) and its tables: per case the µs per call of each timed call, the
verdict against the bare launch (GPU) or ``torch_ref``'s own calls (CPU), and against the anchor op; where the
µs go (``--profile``); the stubbed launch paths."""
from __future__ import annotations

from dataclasses import asdict
from typing import List, Optional

from arfuse.bench.host_cases import HostConfig
from arfuse.bench.host_profile import PARTS

FORMAT = "arfuse-host-bench"
VERSION = 1
GPU_TARGET_RATIO = 1.7  # arfuse / bare kernel launch
CPU_TARGET_US = 10.0  # arfuse - torch_ref's own torch calls
STUB_NOTE = ("CPU-side timing, kernel call stubbed (not constructible on one GPU): Backend.run through arfuse's "
             "launcher and Triton's Python up to the compiled kernel's launcher, which launches nothing; a GPU adds "
             "that launcher's argument parsing and cuLaunchKernelEx (bare_direct on the nccl rows of a GPU run)")


def document(machine: dict, cfg: HostConfig, device: str, runs: List[dict], stubbed: Optional[List[dict]]) -> dict:
    return {"format": FORMAT, "version": VERSION, "machine": machine, "device": device, "config": asdict(cfg),
            "method": ("host wall time per eager call (perf_counter_ns around back-to-back calls; CUDA synchronised "
                       "after the loop, outside the timed part); median of rounds (min_us: the fastest round); "
                       "slowest rank; the anchor (F.rms_norm of the input) timed in the same rounds"),
            "targets": {"gpu_ratio_vs_bare_launch": GPU_TARGET_RATIO, "cpu_overhead_vs_torch_ref_us": CPU_TARGET_US,
                        "ratio_vs_anchor_fastest_rounds": "per row: anchor_target (residual_rmsnorm 1.5, others 2)"},
            "runs": runs, "stubbed_launchers": stubbed, "stub_note": STUB_NOTE}


def validate(doc: object) -> None:
    """ValueError unless ``doc`` is a host-bench document."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError("not an arfuse host-bench document")
    for run in doc.get("runs", []):
        for row in run.get("rows", []):
            if row.get("case") and "timing" not in row:
                raise ValueError(f"row {row.get('case')} has no timing")


def verdict(row: dict, device: str) -> str:
    t = row.get("timing", {})
    a, b = t.get("arfuse"), t.get("bare")
    if not a or not b:
        return ""
    if device == "cuda" and row["backend"] != "torch_ref":
        ratio = a["us"] / b["us"]
        return f"{ratio:.2f}x {'ok' if ratio <= GPU_TARGET_RATIO else 'MISSED'}"
    over = a.get("over_bare_us", a["us"] - b["us"])
    return f"+{over:.1f} {'ok' if over <= CPU_TARGET_US else 'MISSED'}"


def anchor_verdict(row: dict) -> str:
    """arfuse's fastest round over the anchor op's, against the case's target (issue 23)."""
    t = row.get("timing", {})
    a, k = t.get("arfuse"), t.get("anchor")
    if not a or not k:
        return ""
    ratio, target = a["min_us"] / k["min_us"], row.get("anchor_target", 2.0)
    return f"{ratio:.2f}x / {target:g}x {'ok' if ratio <= target else 'MISSED'}"


def print_report(doc: dict, console) -> None:
    """Per world size the cost table (and the profile's, with ``--profile``), then the stubbed launch paths."""
    for run in doc["runs"]:
        console.print(_cost_table(doc, run))
        profiled = [r for r in run["rows"] if r.get("profile_scaled_us")]
        if profiled:
            console.print(_profile_table(profiled))
    if doc.get("stubbed_launchers"):
        console.print(_stub_table(doc))


def _cost_table(doc: dict, run: dict):
    from rich.table import Table

    cfg = doc["config"]
    table = Table(title=f"arfuse host cost per eager call, world size {run['world_size']} on {run['device']} "
                        f"(µs, median of {cfg['samples']} x {cfg['calls']} calls; hidden {cfg['hidden']}, "
                        f"{cfg['tokens']} tokens, {cfg['dtype']}; vs F.rms_norm: fastest rounds)")
    columns = ("backend", "case", "path", "arfuse", "F.rms_norm", "bare", "bare direct", "unfused", "vs bare / target",
               "vs F.rms_norm / target")
    for col in columns:
        table.add_column(col, justify="left" if col in ("backend", "case", "path") else "right")
    for row in run["rows"]:
        if row.get("case") is None:
            table.add_row(row["backend"], "-", row.get("skipped", ""), *[""] * (len(columns) - 3))
            continue
        t = row["timing"]

        def cell(k):
            return f"{t[k]['us']:.1f}" if k in t else "-"

        path = row["path"] + (" (fallback)" if row.get("fallback") else "")
        table.add_row(row["backend"], row["case"], path, cell("arfuse"), cell("anchor"), cell("bare"),
                      cell("bare_direct"), cell("unfused"), verdict(row, doc["device"]), anchor_verdict(row))
    return table


def _profile_table(profiled: List[dict]):
    from rich.table import Table

    parts = [p for p in PARTS if any(r["profile_scaled_us"].get(p, 0) >= 0.05 for r in profiled)]
    table = Table(title="where the µs go (cProfile shares scaled to the unprofiled time, µs per call)")
    table.add_column("backend")
    table.add_column("case")
    for p in parts:
        table.add_column(p, justify="right")
    for r in profiled:
        table.add_row(r["backend"], r["case"], *(f"{r['profile_scaled_us'].get(p, 0.0):.1f}" for p in parts))
    return table


def _stub_table(doc: dict):
    from rich.table import Table

    table = Table(title=f"launch paths (µs per call): {doc['stub_note']}")
    for col in ("backend", "variant", "spec", "arfuse launch path", "bare launch", "difference"):
        table.add_column(col, justify="left" if col in ("backend", "variant", "spec") else "right")
    for row in doc["stubbed_launchers"]:
        if "error" in row:
            table.add_row(row["backend"], row["variant"], row["spec"], row["error"], "", "")
            continue
        t = row["timing"]
        table.add_row(row["backend"], row["variant"], row["spec"], f"{t['launcher']['us']:.1f}",
                      f"{t['bare']['us']:.1f}" if "bare" in t else "-",
                      f"{t['launcher']['over_bare_us']:+.1f}" if "bare" in t else "")
    return table
