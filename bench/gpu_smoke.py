"""First-contact GPU check of the triton_symm kernels: a few cases per variant, printed as a table.
Usage: python bench/gpu_smoke.py WORLD"""
import json
import os
import sys

import torch

from arfuse import Pattern
from arfuse.launch import run_ranks
from tests.gpu.test_triton_symm import VARIANTS, correctness_worker


def main():
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    cases = []
    for b in VARIANTS:
        for pattern in Pattern:
            cases += [(b, pattern, torch.bfloat16, 8192, t) for t in (1, 5, 128)]
    out = run_ranks(correctness_worker, world, cases, 7, device="cuda", timeout_s=240)[0]
    for r in out["results"]:
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['path']:<24} {r['pattern']:<22} {r['tokens']:>5} zc={int(r['zero_copy'])} "
              f"err={r['err']:.2e} res={r['err_residual']:.2e} identical={r['identical']}")
    print(json.dumps(out["stats"], indent=0)[:2000])
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"smoke_tp{world}.json"), "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
