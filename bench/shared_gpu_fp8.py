"""``lamport_two_shot``'s FP8 epilogue, bitwise across ranks, with every rank on ONE GPU (gloo process group).

This is tests/gpu/test_triton_symm.py::test_lamport_two_shot_fp8_is_bitwise_identical_across_ranks for a machine
with one GPU: the ranks' kernels time-slice that GPU and their "peer" buffers are the same device's memory, so it
says nothing about NVLink or cross-GPU memory ordering (the multi-GPU runs cover those for the other patterns);
it does say whether every rank rounds the FP8 outputs the same way, which is what the fix changed.

Usage: python3 bench/shared_gpu_fp8.py [WORLD ...] [--out results.json]
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arfuse import Pattern  # noqa: E402
from arfuse.launch import MULTICAST_GUARDS, free_port  # noqa: E402

CASES = [("triton_symm/lamport_two_shot", Pattern.RESIDUAL_RMSNORM_FP8, torch.bfloat16, hidden, t)
         for hidden in (4096, 8192) for t in (1, 17, 128, 1000)]


def rank_main(rank, world, port, results):
    os.environ.update(MULTICAST_GUARDS, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from tests.gpu.test_triton_symm import fp8_two_shot_worker

        results.put((rank, fp8_two_shot_worker(rank, world, CASES, 300 * world)))
    except BaseException as e:  # reported to the parent, which prints it
        results.put((rank, {"error": f"{type(e).__name__}: {e}"}))
    finally:
        dist.destroy_process_group()


def run(world: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    outs = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return outs[0] if all("error" not in o for o in outs.values()) else {"errors": outs}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("worlds", nargs="*", type=int, default=[2, 4])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    record, failed = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "worlds": {}}, False
    for world in a.worlds:
        out = run(world)
        record["worlds"][str(world)] = out
        if "errors" in out:
            print(f"world {world}: {out['errors']}")
            failed = True
            continue
        rows = out["results"]
        bad = [r for r in rows if not r["ok"]]
        failed |= bool(bad) or len(rows) != len(CASES)
        print(f"world {world} on one GPU: {len(rows) - len(bad)}/{len(CASES)} FP8 cases within tolerance and "
              f"bitwise identical across ranks; worst err {max(r['err'] for r in rows):.2e}; "
              f"paths {sorted({r['path'] for r in rows})}")
        for r in bad:
            print("  failed:", r)
    if a.out:
        Path(a.out).write_text(json.dumps(record, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
