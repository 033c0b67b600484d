"""Verify arfuse's multi-rank kernels on virtual ranks (one GPU), and keep the verification record.

  python bench/verify_kernels.py run --plan smoke --json OUT.json [--workers 14] [--tiers 0,1] [--no-protocol]
                                                                                    (on a GPU)
  python bench/verify_kernels.py record OUT.json [...] --results-dir bench/results/DIR
  python bench/verify_kernels.py evidence --path nccl --kind one_gpu --world-sizes 1 --cases N --json OUT.json
  python bench/verify_kernels.py table                                              (the README's table)

``run`` checks a plan of arfuse.testing.verification_run and writes the results (JSON) and a table; ``record``
turns results into evidence in arfuse/backends/verified.json; ``evidence`` writes one entry for a path that a test
run checked (run it only after that run passed: it records the code it sees); ``table`` prints the verification
table from the record and the code here now.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arfuse.backends import verification


def _run(args) -> int:
    import torch

    from arfuse.cli.output import console, progress
    from arfuse.testing import verification_run as vrun

    if args.plan not in vrun.PLANS:
        print(f"verify_kernels run: --plan: expected one of {', '.join(vrun.PLANS)}, got {args.plan!r}", file=sys.stderr)
        return 2
    tiers = vrun.tiers(args.plan)
    if args.tiers and not args.tiers <= set(range(len(tiers))):
        print(f"verify_kernels run: --tiers: plan {args.plan!r} has tiers 0-{len(tiers) - 1}, got "
              f"{','.join(map(str, sorted(args.tiers)))}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    if args.tiers:  # a plan too long for one device call runs in parts; `record` takes the parts' results together
        tiers = [t if i in args.tiers else [] for i, t in enumerate(tiers)]
    protocol = vrun.protocol_checks(replays=args.replays) if args.protocol else None
    n = sum(len(t) for t in tiers)
    checks = len(protocol["timeouts"]) + len(protocol["graphs"]) if protocol else 0
    bar = progress(n * (2 if args.workers else 1) + checks, f"verify {args.plan}", unit="check")
    results = vrun.run(tiers, device, protocol, args.workers, deadline_s=args.deadline,
                       progress=lambda stage, k: (bar.set_postfix_str(stage, refresh=False), bar.update(k)))
    bar.close()
    results["plan"] = args.plan
    results["tiers"] = sorted(args.tiers) if args.tiers else "all"
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    console().print(summary(results))
    for line in results["skipped"]:
        print(f"skipped: {line}", file=sys.stderr)
    bad = [r for r in results["points"] + results["timeouts"] + results["graphs"] if not r["ok"]]
    for r in bad[:40]:
        print(f"FAILED {json.dumps({k: v for k, v in r.items() if k not in ('errors',)})}", file=sys.stderr)
    return 1 if bad else 0


def summary(results: dict):
    """A rich table: per variant and world size, points passed, timeout and graph checks passed, worst errors."""
    from rich.table import Table

    table = Table(title=f"virtual ranks on {results['environment']['device']}")
    for col in ("variant", "world", "points ok", "timeout ok", "graphs ok", "worst rel. error"):
        table.add_column(col)
    keys = sorted({(p["variant"], p["world"]) for p in results["points"] + results["timeouts"] + results["graphs"]})
    for variant, world in keys:
        pts = [p for p in results["points"] if (p["variant"], p["world"]) == (variant, world)]
        tos = [c for c in results["timeouts"] if (c["variant"], c["world"]) == (variant, world)]
        grs = [c for c in results["graphs"] if (c["variant"], c["world"]) == (variant, world)]
        worst = max([e for p in pts for e, _ in p["errors"].values() if e != float("inf")] +
                    [c["worst_error"] for c in grs], default=0.0)
        table.add_row(variant, str(world), f"{sum(p['ok'] for p in pts)}/{len(pts)}",
                      f"{sum(c['ok'] for c in tos)}/{len(tos)}", f"{sum(c['ok'] for c in grs)}/{len(grs)}",
                      f"{worst:.2e}")
    return table


def _record(args) -> int:
    from arfuse.testing import verification_run as vrun

    results = [json.loads(Path(f).read_text()) for f in args.results]
    record = verification.load()
    for path, entry in vrun.evidence(results, args.results_dir).items():
        for gap in entry["gaps"]:
            print(f"{path}: {gap}", file=sys.stderr)
        if not entry.pop("recordable"):
            print(f"{path}: nothing recorded (no world size with its timeout and graph checks)")
            continue
        verification.add(record, path, entry)
        verdict = "vouches for " + ", ".join(entry["features"] or ["the base pattern"]) if entry["ok"] else "refused"
        print(f"{path}: {verdict}"
              f"{'; refused: ' + json.dumps(entry['refused']) if entry['refused'] else ''}")
    verification.save(record)
    return 0


def _evidence(args) -> int:
    import torch

    from arfuse.backends.base import ALL_FEATURES, get
    from arfuse.testing import verification_run as vrun

    backend_name, _, variant = args.path.partition("/")
    backend = get(backend_name)
    env = vrun.environment(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    sources = verification.fingerprint(backend.verified_sources(variant or "default"))[0]
    features = sorted(ALL_FEATURES) if args.features == "all" else sorted(args.features.split(","))
    entry = dict(kind=args.kind, date=env["date"], device=env["device"], torch=env["torch"], triton=env["triton"],
                 commit=env["commit"], sources=sources, world_sizes=[int(w) for w in args.world_sizes.split(",")],
                 cases=args.cases, ok=True, features=features, refused={}, results=args.results_dir,
                 checked_by=args.checked_by, dtypes=sorted(args.dtypes.split(",")))
    if args.any_world_size:
        entry["any_world_size"] = args.any_world_size
    Path(args.json).write_text(json.dumps({"path": args.path, "entry": entry}, indent=1))
    return 0


def _add_evidence(args) -> int:
    record = verification.load()
    for f in args.files:
        found = json.loads(Path(f).read_text())
        verification.add(record, found["path"], found["entry"], found.get("section", "paths"))
    verification.save(record)
    return 0


def _table(args) -> int:
    from arfuse.backends.verification import table

    print(table())
    return 0


def _indices(text: str) -> set:
    try:
        return {int(i) for i in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected tier numbers like 0,1 - got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="verify_kernels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="check a plan on virtual ranks (GPU)")
    p.add_argument("--plan", default="smoke")
    p.add_argument("--json", required=True)
    p.add_argument("--workers", type=int, default=0, help="compile in this many processes first")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no new check starts")
    p.add_argument("--replays", type=int, default=1000, help="CUDA-graph replays per graph check")
    p.add_argument("--tiers", type=_indices, default=None, help="run only these tiers of the plan (0,1,...)")
    p.add_argument("--no-protocol", dest="protocol", action="store_false",
                   help="leave out the timeout and graph checks (another part of the run has them)")
    p.set_defaults(fn=_run)
    p = sub.add_parser("record", help="add a run's evidence to arfuse/backends/verified.json")
    p.add_argument("results", nargs="+")
    p.add_argument("--results-dir", required=True)
    p.set_defaults(fn=_record)
    p = sub.add_parser("evidence", help="write one evidence entry for a path a test run checked")
    p.add_argument("--path", required=True)
    p.add_argument("--kind", choices=verification.KINDS, required=True)
    p.add_argument("--world-sizes", required=True)
    p.add_argument("--features", default="all")
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--results-dir", required=True)
    p.add_argument("--checked-by", required=True, help="what checked it (the test file)")
    p.add_argument("--dtypes", required=True, help="the dtypes it checked, comma-separated (bfloat16,float16,...)")
    p.add_argument("--any-world-size", default="", help="why the evidence holds at every world size (the path's "
                                                         "code does not depend on it); default: only those run")
    p.add_argument("--json", required=True)
    p.set_defaults(fn=_evidence)
    p = sub.add_parser("add", help="add evidence files written by `evidence` to the record")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=_add_evidence)
    p = sub.add_parser("table", help="print the verification table (markdown)")
    p.set_defaults(fn=_table)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
