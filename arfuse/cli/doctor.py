"""``arfuse doctor [--json]``: which backends can run here, and why not.

For every registered backend: available yes/no with the reason, judged on one representative call
(``--tokens``, ``--hidden-size``, ``--dtype``) for this process's group: WORLD under ``torchrun``, else a world of
one. For FlashInfer also: version, API generation, the per-kwarg support flags and which API arfuse drives. Works
without a GPU (and says why GPU backends are then unavailable). Under ``torchrun`` every rank probes (the group
facts are collective) and rank 0 prints. ``--json`` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--tokens", type=int, default=1, help="token count of the representative call")
    parser.add_argument("--hidden-size", type=int, default=8192, help="hidden size of the representative call")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the representative call")


def _no_gpu_reason() -> Optional[str]:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (driver missing or CUDA_VISIBLE_DEVICES empty)"
    return None


def _setup():
    """(device, joined_torchrun): join the torchrun group if launched by it, else a world of one."""
    import torch

    from arfuse.launch import init_rank, under_torchrun

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    if under_torchrun():
        import os

        return init_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), kind), True
    return (torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")), False


def _backend_entry(backend, problem, caps, no_gpu: Optional[str]) -> Dict[str, Any]:
    from arfuse.select.policy import why_not  # the selector's own verdict, multi-host restriction included

    reasons = {v: why_not(backend, problem, caps, v) for v in backend.variants}
    capable = [v for v, r in reasons.items() if r is None]
    reason = "" if capable else next(iter(reasons.values()))
    if reason.startswith("device cpu") and no_gpu:
        reason = f"{reason}: {no_gpu}"
    elif reason.startswith("world size 1 "):
        reason += "; run under torchrun with 2+ ranks to check the real group"
    return {"available": bool(capable), "reason": reason, "priority": backend.priority,
            "variants": {v: r or "ok" for v, r in reasons.items()}}


def collect(args) -> Dict[str, Any]:
    """The report as a plain dict. Collective under torchrun."""
    import torch

    from arfuse.backends import base
    from arfuse.core.types import Pattern, Problem
    from arfuse.probe import flashinfer_api
    from arfuse.probe.group import group_caps

    device, joined = _setup()
    caps = group_caps(None, device)
    fi = flashinfer_api.probe()
    no_gpu = _no_gpu_reason()
    dtype = getattr(torch, args.dtype)
    problem = Problem(Pattern.RESIDUAL_RMSNORM, args.tokens, args.hidden_size, dtype, device.type, caps.world_size)
    backends = {}
    for backend in base.registered():
        backends[backend.name] = _backend_entry(backend, problem, caps, no_gpu)
    backends.setdefault("flashinfer", {"available": False, "reason": "backend not registered"})
    backends["flashinfer"].update(fi.as_dict(), available=backends["flashinfer"]["available"],
                                  reason=backends["flashinfer"]["reason"], installed=fi.available,
                                  probe_reason=fi.reason)
    from arfuse.select.policy import group_restriction

    report = {
        "backends": backends,
        "group_restriction": group_restriction(caps),
        "device": {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": no_gpu is None,
                   "no_gpu_reason": no_gpu, "device": str(device),
                   "gpu_count": torch.cuda.device_count() if no_gpu is None else 0, "gpu_name": caps.gpu_name,
                   "sm": list(caps.sm) if caps.sm else None, "world_size": caps.world_size, "rank": caps.rank,
                   "under_torchrun": joined, "dist_backend": caps.dist_backend, "single_host": caps.single_host,
                   "p2p": caps.p2p, "symm_mem": caps.symm_mem, "triton": caps.triton, "notes": list(caps.notes)},
        "problem": {"pattern": problem.spec.name, "tokens": problem.num_tokens, "hidden_size": args.hidden_size,
                    "dtype": args.dtype},
    }
    if joined:
        import torch.distributed as dist

        dist.destroy_process_group()
    return report


def _render(report: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    dev = report["device"]
    table = Table(title="arfuse doctor: backends", show_lines=True)
    for col in ("backend", "available", "reason / variants"):
        table.add_column(col)
    for name, b in report["backends"].items():
        detail = b["reason"] or ", ".join(f"{v}: {r}" for v, r in b.get("variants", {}).items())
        table.add_row(name, "[green]yes[/green]" if b["available"] else "[red]no[/red]", detail)
    console.print(table)
    fi = report["backends"]["flashinfer"]
    fit = Table(title="FlashInfer", show_header=False)
    fit.add_row("installed", f"{'yes' if fi['installed'] else 'no'} {fi['probe_reason']}".strip())
    fit.add_row("version / API", f"{fi['version']} / {fi['api']}")
    fit.add_row("module", str(fi.get("module_file")))
    fit.add_row("arfuse drives", ", ".join(f"{k}: {v}" for k, v in fi.get("paths", {}).items()) or "-")
    fit.add_row("supports", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in fi["supports"].items()))
    for note in fi.get("notes", []):
        fit.add_row("note", note)
    console.print(fit)
    devt = Table(title="device and group", show_header=False)
    for key in ("torch", "cuda", "device", "gpu_count", "gpu_name", "sm", "world_size", "rank", "dist_backend",
                "p2p", "single_host", "symm_mem", "triton", "no_gpu_reason"):
        devt.add_row(key, str(dev[key]))
    for note in dev["notes"]:
        devt.add_row("note", note)
    if report.get("group_restriction"):
        devt.add_row("selection", f"{report['group_restriction']}: only NCCL + fused norm (and torch_ref) run "
                                  "across hosts")
    console.print(devt)


def run(args) -> int:
    import contextlib

    # a package that prints on import (some do) must not corrupt the one JSON object on stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report = collect(args)
    if report["device"]["rank"] != 0:
        return 0
    if args.json:
        print(json.dumps(report, default=str))
    else:
        _render(report)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="arfuse doctor")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
