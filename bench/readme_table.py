"""Markdown tables for the README from `arfuse bench --json` files, one per shape (world size, hidden, dtype).
Usage: python bench/readme_table.py BENCH.json [BENCH.json ...]

Columns: arfuse `auto` (and the path it ran), the fastest of arfuse's own kernels, FlashInfer's best variant,
NCCL + compiled norm, torch's symmetric-memory ops + norm, and auto's time over the best peer's (below 1: faster).
"""
import json
import sys
from typing import Callable, Optional

from arfuse.bench import report


def _fastest(ms, keep: Callable[[dict], bool]) -> Optional[dict]:
    return report.best(m for m in ms if keep(m))


def _us(m: Optional[dict], named: bool = True) -> str:
    if m is None:
        return "-"
    name = m["path"].removeprefix("triton_symm/")
    return f"{m['us']:.2f} ({name})" if named else f"{m['us']:.2f}"


def table(ms) -> str:
    head = ("| tokens | arfuse `auto` (ran) | fastest arfuse kernel | FlashInfer (best variant) | NCCL + compiled norm "
            "| torch symm-mem + norm (best) | auto / best peer |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for n in sorted({m["tokens"] for m in ms}):
        at = [m for m in ms if m["tokens"] == n]
        auto = _fastest(at, lambda m: m["kind"] == "auto")
        if auto is not None:
            auto = dict(auto, path=auto["ran"][0] if auto.get("ran") else auto["path"])
        own = _fastest(at, lambda m: m["path"].startswith("triton_symm/"))
        fi = _fastest(at, lambda m: m["path"].startswith("flashinfer"))
        nccl = _fastest(at, lambda m: m["path"] in report.BASELINE)
        symm = _fastest(at, lambda m: m["path"].startswith("symm_mem"))
        peer = _fastest(at, report.is_peer)
        ratio = f"{auto['us'] / peer['us']:.2f}x" if auto and peer else "-"
        lines.append(f"| {n} | {_us(auto)} | {_us(own)} | {_us(fi)} | {_us(nccl, False)} | {_us(symm, False)} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main(paths) -> int:
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for (world, hidden, dtype), ms in report.by_shape(report.validate(doc)).items():
            print(f"**TP{world}, hidden {hidden}, {dtype}** (µs per call; from `{path}`)\n")
            print(table(ms) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) if len(sys.argv) > 1 else print(__doc__) or 2)
