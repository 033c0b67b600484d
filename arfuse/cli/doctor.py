"""``arfuse doctor [--json]``: which backends can run here, and why not.

For every registered backend: available yes/no with the reason, judged on one representative call
(``--tokens``, ``--hidden``, ``--dtype``) for this process's group: WORLD under ``torchrun``, else a world of
one. For FlashInfer also: version, API generation, the per-kwarg support flags and which API arfuse drives. Works
without a GPU (and says why GPU backends are then unavailable). Under ``torchrun`` every rank probes (the group
facts are collective) and rank 0 prints. ``--json`` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Tuple

from arfuse.cli import args as args_, output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables (default: "
                                                            "tables)")
    parser.add_argument("--tokens", type=args_.positive_int, default=1,
                        help="token count of the representative call (default: 1)")
    parser.add_argument("--hidden", type=args_.positive_int, default=8192,
                        help="hidden size of the representative call (default: 8192)")
    args_.add_hidden_alias(parser, "hidden", args_.positive_int)
    parser.add_argument("--dtype", type=args_.dtype, default="bfloat16",
                        help=f"dtype of the representative call: {args_.DTYPE_HELP} (default: bfloat16)")


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


def flashinfer_fusions(fi) -> Dict[str, str]:
    """One row per kind of fused call beyond the classic four: the FlashInfer pattern (and API path) the installed
    release runs it with, or why it cannot (nothing when FlashInfer is unusable: its reason is shown already);
    verification on GPUs is reported per backend, not here."""
    if not fi.available:
        return {}
    from arfuse.backends import flashinfer_patterns
    from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout

    group = dict(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128)
    kinds = [dict(weight_offset=True), dict(quant=Quant.FP8_STATIC, also_norm=True),
             dict(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
             dict(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32, also_norm=True),
             dict(group, scale_layout=ScaleLayout.UE8M0), dict(group, scale_layout=ScaleLayout.UE8M0, also_norm=True),
             dict(group, scale_layout=ScaleLayout.FP32), dict(prologue=Prologue.MOE_FINALIZE),
             dict(prologue=Prologue.MOE_FINALIZE, shared_expert=True, weight_offset=True),
             dict(prologue=Prologue.MOE_FINALIZE, quant=Quant.FP8_STATIC)]
    return dict(flashinfer_patterns.availability(fi, [FusionSpec(**k) for k in kinds]))


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
    problem = Problem(Pattern.RESIDUAL_RMSNORM, args.tokens, args.hidden, dtype, device.type, caps.world_size)
    backends = {}
    for backend in base.registered():
        backends[backend.name] = _backend_entry(backend, problem, caps, no_gpu)
    backends.setdefault("flashinfer", {"available": False, "reason": "backend not registered"})
    backends["flashinfer"].update(fi.as_dict(), available=backends["flashinfer"]["available"],
                                  reason=backends["flashinfer"]["reason"], installed=fi.available,
                                  probe_reason=fi.reason, fusions=flashinfer_fusions(fi))
    from arfuse.backends import verification
    from arfuse.select.policy import group_restriction

    report = {
        "backends": backends,
        "verification": [verification.summary(v, verification.triton_version()) for v in verification.verdicts()],
        "group_restriction": group_restriction(caps),
        "device": {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": no_gpu is None,
                   "no_gpu_reason": no_gpu, "device": str(device),
                   "gpu_count": torch.cuda.device_count() if no_gpu is None else 0, "gpu_name": caps.gpu_name,
                   "sm": list(caps.sm) if caps.sm else None, "world_size": caps.world_size, "rank": caps.rank,
                   "under_torchrun": joined, "dist_backend": caps.dist_backend, "single_host": caps.single_host,
                   "p2p": caps.p2p, "symm_mem": caps.fact("symm_mem"), "triton": caps.fact("triton"),
                   "triton_installed": _triton_version(), "notes": list(caps.notes)},
        "problem": {"pattern": problem.spec.name, "tokens": problem.num_tokens, "hidden_size": args.hidden,
                    "dtype": args.dtype},
    }
    if joined:
        import torch.distributed as dist

        dist.destroy_process_group()
    return report


def _triton_version() -> Optional[str]:
    """The installed Triton's version as the verification record reads it, or None (not installed)."""
    from arfuse.backends import verification

    found = verification.triton_version()
    return "installed (version unknown)" if found == "unknown" else found


def _yes_no(value: bool, why_not: Optional[str] = None) -> str:
    return "yes" if value else (f"no: {why_not}" if why_not else "no")


def flashinfer_rows(fi: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The FlashInfer table: what is installed (from the package metadata, even when the import fails), whether
    arfuse can use it and why not, and what its API offers."""
    version = fi.get("version")
    rows = [("installed", f"yes, version {version}" if version else
             ("yes (version unknown)" if fi.get("module_file") else "no (pip install flashinfer-python)")),
            ("usable", _yes_no(fi["installed"], fi["probe_reason"] if version or fi.get("module_file") else None))]
    if fi.get("module_file"):
        rows.append(("module", fi["module_file"]))
    if fi["installed"]:
        rows += [("API", str(fi["api"])),
                 ("arfuse drives", ", ".join(f"{k}: {v or 'none'}" for k, v in fi.get("paths", {}).items()) or "-"),
                 ("supports", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in fi["supports"].items()))]
    rows += [("note", note) for note in fi.get("notes", [])]
    rows += list(fi.get("fusions", {}).items())
    return rows


def device_rows(dev: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The device and group table, every "no" with its reason where one is known."""
    no_gpu = dev["no_gpu_reason"]
    notes = dev["notes"]

    def why(prefix: str) -> Optional[str]:
        found = next((n for n in notes if n.startswith(prefix + ":")), None)
        if found:
            return found.split(": ", 1)[-1]
        if no_gpu:
            return f"no GPU ({no_gpu})"
        return "a world of one has no peers" if prefix == "p2p" and dev["world_size"] == 1 else None

    triton = dev.get("triton_installed")
    if dev["triton"]:
        triton_text = f"yes, version {triton}"
    elif triton:
        triton_text = f"installed (version {triton}), unused: {why('triton') or 'no CUDA device'}"
    else:
        triton_text = "no: not installed (pip install triton); arfuse's own GPU kernels need it"
    rows = [("torch", dev["torch"]), ("cuda", dev["cuda"] or "none (torch built without CUDA)"),
            ("device", dev["device"]), ("gpus", f"{dev['gpu_count']}" + (f" x {dev['gpu_name']}, sm "
                                                                         f"{'.'.join(map(str, dev['sm']))}"
                                                                         if dev["gpu_name"] and dev["sm"] else "")),
            ("group", f"rank {dev['rank']} of {dev['world_size']}, " +
             (f"{dev['dist_backend']}" if dev["dist_backend"] else "no process group (a world of one)") +
             (", one host" if dev["single_host"] else ", several hosts")),
            ("peer access (p2p)", _yes_no(dev["p2p"], why("p2p"))),
            ("symmetric memory", _yes_no(dev["symm_mem"], why("symm_mem"))),
            ("triton", triton_text)]
    explained = ("p2p:", "symm_mem:", "triton:")  # shown as the reasons above
    rows += [("note", n) for n in notes if not n.startswith(explained)]
    return rows


def _render(report: Dict[str, Any]) -> None:
    from rich.table import Table

    console = output.console()
    table = Table(title="arfuse doctor: backends", show_lines=True)
    for col in ("backend", "available", "reason / variants"):
        table.add_column(col)
    for name, b in report["backends"].items():
        detail = b["reason"] or ", ".join(f"{v}: {r}" for v, r in b.get("variants", {}).items())
        table.add_row(name, "[green]yes[/green]" if b["available"] else "[red]no[/red]", detail)
    console.print(table)
    checked = Table(title="arfuse doctor: verified on GPUs, for the code installed here", show_lines=True)
    for col in ("path", "verified now", "evidence on this code", "stale evidence (code changed since)"):
        checked.add_column(col)
    for v in report["verification"]:
        checked.add_row(v["path"], v["verified"], "; ".join(v["evidence"]) or "-", "; ".join(v["stale"]) or "-")
    console.print(checked)
    for title, rows in (("FlashInfer", flashinfer_rows(report["backends"]["flashinfer"])),
                        ("device and group", device_rows(report["device"]))):
        facts = Table(title=title, show_header=False)
        for key, value in rows:
            facts.add_row(key, str(value))
        if title != "FlashInfer" and report.get("group_restriction"):
            facts.add_row("selection", f"{report['group_restriction']}: only NCCL + fused norm (and torch_ref) run "
                                       "across hosts")
        console.print(facts)


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
