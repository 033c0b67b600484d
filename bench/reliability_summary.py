"""Add up the reliability tests' figures for the README. Usage: python bench/reliability_summary.py [DIR...]
(default: $ARFUSE_RESULTS_DIR). Reads every reliability_*.json and fuzz_summary.json under the directories, prints
one line per file and the README line: cases tried, faults survived, hangs, wrong results. Exits 1 if any file
records a hang, a wrong result or a fault not survived (or nothing was found)."""
import json
import os
import sys
from pathlib import Path

from arfuse.testing import COUNTS, PREFIX, RESULTS_ENV


def load(dirs):
    files = sorted({p for d in dirs for pattern in (f"{PREFIX}*.json", "fuzz_summary.json")
                    for p in Path(d).rglob(pattern)})
    return [(p, json.loads(p.read_text())) for p in files]


def summarize(figures):
    """Sums of COUNTS over ``figures`` (dicts) and the worst error recorded."""
    total = {k: sum(int(f.get(k) or 0) for f in figures) for k in COUNTS}
    errors = [f["worst_error"] for f in figures if f.get("worst_error") is not None]
    total["worst_error"] = max(errors) if errors else None  # a NaN recorded anywhere shows as nan
    if any(e != e for e in errors):
        total["worst_error"] = float("nan")
    return total


def line(total, fuzzed):
    worst = "n/a" if total["worst_error"] is None else f"{total['worst_error']:.2g}"
    return (f"Reliability: {total['cases']:,} cases tried ({fuzzed:,} fuzzed calls), "
            f"{total['replays']:,} CUDA-graph replays, {total['faults_survived']} of {total['faults_injected']} "
            f"injected faults survived, {total['hangs']} hangs, {total['wrong_results']} wrong results "
            f"(worst error vs float64: {worst})")


def main(argv):
    dirs = argv or [os.environ.get(RESULTS_ENV, "")]
    if not any(dirs):
        print(__doc__)
        return 2
    found = load(dirs)
    if not found:
        print(f"no reliability figures under {', '.join(dirs)}")
        return 1
    for path, f in found:
        print(f"{path.name:<48} " + " ".join(f"{k}={f.get(k)}" for k in COUNTS) + f" worst_error={f.get('worst_error')}")
    figures = [f for _, f in found]
    total = summarize(figures)
    fuzzed = sum(int(f.get("cases") or 0) for f in figures if f.get("test") == "fuzz")
    print(line(total, fuzzed))
    healthy = (total["hangs"] == 0 and total["wrong_results"] == 0
               and total["faults_survived"] == total["faults_injected"])
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
