"""What a benchmark run leaves behind: the machine and versions, the JSON document, and the rich tables."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from arfuse.bench.peers import BASELINE

FORMAT = "arfuse-bench"
VERSION = 1
EXTERNAL_BACKENDS = ("flashinfer",)  # driven by arfuse, but someone else's kernels: they count as peers too
ENV_KEYS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "NCCL_ALGO",
            "NCCL_PROTO", "CUDA_VISIBLE_DEVICES")

Shape = Tuple[int, int, str]  # (world size, hidden, dtype)


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> Dict[str, object]:
    """The machine, GPUs and versions a run was measured on (not collective; call it on one process)."""
    import arfuse

    info: Dict[str, object] = {
        "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arfuse": arfuse.__version__, "git_commit": _git_commit(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _dist_version("triton", "pytorch-triton"),
        "flashinfer": _dist_version("flashinfer-python", "flashinfer"), "nccl": None, "gpus": [],
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):
            info["nccl"] = None
    return info


def document(machine: Dict[str, object], config: Dict[str, object], runs: Sequence[Dict[str, list]]) -> dict:
    """The JSON written by ``arfuse bench --json``: machine, config, every shape and every measurement."""
    return {"format": FORMAT, "version": VERSION, "machine": machine, "config": config,
            "shapes": [s for r in runs for s in r["shapes"]],
            "measurements": [m for r in runs for m in r["measurements"]]}


def validate(doc: object) -> List[dict]:
    """The measurements of a bench JSON document; ValueError naming the problem if it is not one."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"not an arfuse bench document (format {found!r}, expected {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"unsupported bench document version {doc.get('version')!r} (this arfuse reads {VERSION})")
    measurements = doc.get("measurements")
    if not isinstance(measurements, list):
        raise ValueError("bench document: 'measurements' must be a list")
    return measurements


# -- summaries -------------------------------------------------------------------------------------------------
def is_peer(m: dict) -> bool:
    return m["kind"] == "peer" or m["path"].split("/")[0] in EXTERNAL_BACKENDS


def by_shape(measurements: Iterable[dict]) -> Dict[Shape, List[dict]]:
    out: Dict[Shape, List[dict]] = {}
    for m in measurements:
        out.setdefault((m["world_size"], m["hidden"], m["dtype"]), []).append(m)
    return out


def ordered_paths(ms: Sequence[dict], ran_only: bool = False) -> List[str]:
    """arfuse's paths, then auto, then the peers, each in first-seen order (``ran_only``: those that ran at
    some size, passed or FAILED)."""
    seen = list(dict.fromkeys(m["path"] for m in ms if not ran_only or m["status"] != "n/a"))
    kind = {m["path"]: m["kind"] for m in ms}
    rank = {"backend": 0, "auto": 1, "peer": 2}
    return sorted(seen, key=lambda p: rank[kind[p]])


def best(ms: Iterable[dict]) -> Optional[dict]:
    ok = [m for m in ms if m["status"] == "ok"]
    return min(ok, key=lambda m: m["us"]) if ok else None


def summary(ms: Sequence[dict]) -> List[dict]:
    """Per token count: the baseline (NCCL + norm), the best peer, the best arfuse path and auto."""
    rows = []
    for n in sorted({m["tokens"] for m in ms}):
        at = [m for m in ms if m["tokens"] == n]
        rows.append({
            "tokens": n,
            "baseline": best(m for m in at if m["path"] in BASELINE),
            "best_peer": best(m for m in at if is_peer(m)),
            "best_backend": best(m for m in at if m["kind"] == "backend"),
            "auto": best(m for m in at if m["kind"] == "auto"),
        })
    return rows


# -- tables ----------------------------------------------------------------------------------------------------
def _bounds(m: dict) -> Tuple[float, float]:
    """The measured spread of ``m`` (its interquartile range on CPU), or just its figure where none was taken."""
    spread = m.get("us_spread")
    return (spread[0], spread[1]) if spread else (m["us"], m["us"])


def within_spread(a: dict, b: dict) -> bool:
    """Whether two passing measurements cannot be told apart: their spreads overlap (on CUDA, where no spread is
    taken, only equal figures)."""
    a_lo, a_hi = _bounds(a)
    b_lo, b_hi = _bounds(b)
    return a_lo <= b_hi and b_lo <= a_hi


def _cell(m: Optional[dict], fastest: Optional[dict]) -> str:
    if m is None:
        return ""
    if m["status"] == "FAILED":
        return "[bold red]FAILED[/]"
    if m["status"] != "ok":
        return "[dim]-[/]"
    text = f"{m['us']:.2f}" if m["us"] < 100 else f"{m['us']:.1f}"
    if not m.get("identical", True):
        text += "≠"
    top = fastest is not None and (m["us"] <= fastest["us"] * 1.0000001 or within_spread(m, fastest))
    return f"[bold green]{text}[/]" if top else text


def _ratio(ref: Optional[dict], m: Optional[dict]) -> str:
    if ref is None or m is None or m["status"] != "ok":
        return "-"
    r = ref["us"] / m["us"]
    if m is not ref and within_spread(ref, m):
        return f"[yellow]≈{r:.2f}[/]"
    color = "green" if r >= 1.0 else ("yellow" if r >= 0.95 else "red")
    return f"[{color}]{r:.2f}[/]"


def latency_table(shape: Shape, ms: Sequence[dict]):
    """µs per call: one row per token count, one column per path that ran."""
    from rich.table import Table

    paths = ordered_paths(ms, ran_only=True)
    table = Table()
    table.add_column("tokens", justify="right")
    for p in paths:
        table.add_column(p, justify="right", style="bold" if p == "auto" else None)
    for n in sorted({m["tokens"] for m in ms}):
        at = {m["path"]: m for m in ms if m["tokens"] == n}
        fastest = best(at.values())
        table.add_row(str(n), *[_cell(at.get(p), fastest) for p in paths])
    return table


def speedup_table(shape: Shape, ms: Sequence[dict]):
    """Ratios only: per arfuse path, (baseline µs / its µs) and (best peer µs / its µs); the last column names
    the best peer (its µs are in the latency table)."""
    from rich.table import Table

    ours = [p for p in ordered_paths(ms, ran_only=True) if not is_peer(next(m for m in ms if m["path"] == p))]
    table = Table()
    for col in ["tokens", *ours]:
        table.add_column(col, justify="right")
    table.add_column("best peer")
    for row in summary(ms):
        at = {m["path"]: m for m in ms if m["tokens"] == row["tokens"]}
        cells = [f"{_ratio(row['baseline'], at.get(p))} / {_ratio(row['best_peer'], at.get(p))}" for p in ours]
        peer = row["best_peer"]
        table.add_row(str(row["tokens"]), *cells, peer["path"] if peer else "-")
    return table


def failures_table(ms: Sequence[dict]):
    from rich.table import Table

    bad = [m for m in ms if m["status"] == "FAILED"]
    if not bad:
        return None
    table = Table()
    for col in ("TP", "hidden", "dtype", "tokens", "path", "reason"):
        table.add_column(col)
    for m in bad:
        table.add_row(str(m["world_size"]), str(m["hidden"]), m["dtype"], str(m["tokens"]), m["path"],
                      str(m["reason"]))
    return table


CPU_NOTE = ("CPU timings are indicative only (the ranks share this host's cores with each other and with anything "
            "else running): a difference within the spread is no difference.")
LATENCY_LEGEND = ("bold green: fastest{ties}; ≠: outputs differ across ranks; -: cannot run at that size")
SPEEDUP_LEGEND = (">1: faster; {baseline} = the baseline, best peer = the fastest of the peers and FlashInfer's "
                  "kernels{ties}")


def print_report(doc: dict, console=None) -> None:
    """Print the latency and speed-up tables of every shape, the failures, and the machine. Each table gets a
    heading and a legend line of its own (a rich title or caption would wrap to the table's width)."""
    from rich.console import Console

    console = console or Console()
    method = str(doc["config"].get("timing_method", ""))
    cpu = method.startswith("cpu") or doc["config"].get("device") == "cpu"
    console.print(f"[dim]timing: {method}[/]")
    if cpu:
        console.print(f"[yellow]{CPU_NOTE}[/]")
    ties = " (and every path within its spread)" if cpu else ""
    for shape, ms in sorted(by_shape(doc["measurements"]).items()):
        world, hidden, dtype = shape
        console.print(f"\n[bold]µs per call - TP{world}, hidden {hidden}, {dtype}[/]")
        console.print(latency_table(shape, ms))
        console.print(f"[dim]{LATENCY_LEGEND.format(ties=ties)}[/]")
        shown = ordered_paths(ms, ran_only=True)
        for p in ordered_paths(ms):
            if p not in shown:
                console.print(f"[dim]  not run: {p}: {next(m['reason'] for m in ms if m['path'] == p)}[/]")
        baseline = next((p for p in BASELINE if any(m["path"] == p for m in ms)), "(no baseline)")
        console.print(f"\n[bold]speed-up (×) vs {baseline} / vs best peer - TP{world}, hidden {hidden}, {dtype}[/]")
        console.print(speedup_table(shape, ms))
        console.print(f"[dim]{SPEEDUP_LEGEND.format(baseline=baseline, ties='; ≈: within the spread' if cpu else '')}"
                      f"[/]")
    failed = failures_table(doc["measurements"])
    if failed is not None:
        console.print("\n[bold red]FAILED[/] (checked against the float64 reference before timing; not timed)")
        console.print(failed)
    m = doc["machine"]
    gpus = m.get("gpus") or []
    where = f"{len(gpus)}x {gpus[0]}" if gpus else "cpu"
    console.print(f"[dim]{m['host']}: {where} | torch {m['torch']} | cuda {m['cuda']} | "
                  f"nccl {m['nccl']} | triton {m['triton']} | flashinfer {m['flashinfer']} | {m['date']}[/]")
