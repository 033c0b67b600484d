"""Quick side-by-side timing of arfuse's kernel paths (development aid; `arfuse bench` is the full tool).

The project's timing method: 10 calls captured per CUDA graph, warm-up, 20 timed replays, mean per call,
max over ranks. Usage: python bench/kernel_timing.py --world 4 --hidden 8192 --out results.json
"""
import argparse
import json
import sys

import torch
import torch.distributed as dist

from arfuse import AllReduceFusion
from arfuse.kernels import launch_config
from arfuse.launch import run_ranks

PATHS = ("triton_symm/lamport", "triton_symm/one_shot", "triton_symm/two_shot", "nccl", "flashinfer/oneshot",
         "flashinfer/twoshot", "flashinfer")


def time_path(fusion, x, res, w, calls=10, replays=20):
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    for _ in range(3):
        fusion.residual_rmsnorm(x, res, w, 1e-6, norm_out=out, residual_out=res_out)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fusion.residual_rmsnorm(x, res, w, 1e-6, norm_out=out, residual_out=res_out)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = torch.tensor([start.elapsed_time(end) * 1000 / (replays * calls)], device=x.device)
    dist.all_reduce(us, op=dist.ReduceOp.MAX)
    return us.item()


def worker(rank, world, hidden, tokens_list, paths):
    dev = torch.device("cuda", torch.cuda.current_device())
    top = max(tokens_list)
    rows = []
    for path in paths:
        # "triton_symm/lamport@split=N,warps=W": the Lamport kernel with its launch forced (either key optional)
        backend, _, forced = path.partition("@")
        knobs = dict(kv.split("=") for kv in forced.split(",") if kv)
        launch_config.LAMPORT_PUSH_SPLIT = int(knobs["split"]) if "split" in knobs else None
        launch_config.LAMPORT_NUM_WARPS = int(knobs["warps"]) if "warps" in knobs else None
        try:
            f = AllReduceFusion(max_tokens=top, hidden_size=hidden, dtype=torch.bfloat16, device=dev, backend=backend,
                                strict=True)
        except Exception as e:  # report the path as unavailable, keep timing the others
            rows += [dict(path=path, tokens=n, us=None, note=f"{type(e).__name__}: {e}") for n in tokens_list]
            continue
        for n in tokens_list:
            plan = f.plan("residual_rmsnorm", n)
            if plan.fallback:
                rows.append(dict(path=path, tokens=n, us=None, note=plan.reason))
                continue
            g = torch.Generator(device=dev).manual_seed(rank * 1000 + n)
            x = torch.randn(n, hidden, dtype=torch.bfloat16, device=dev, generator=g)
            res = torch.randn(n, hidden, dtype=torch.bfloat16, device=dev)
            w = torch.ones(hidden, dtype=torch.bfloat16, device=dev)
            rows.append(dict(path=path, tokens=n, us=time_path(f, x, res, w)))
        f.close()
    return rows


def split_paths(text):
    """``"a@split=2,warps=4,b"`` -> ``["a@split=2,warps=4", "b"]``: a knob (``k=v`` with no path) joins the path before
    it."""
    paths = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if paths and "=" in part and "/" not in part and "@" not in part:
            paths[-1] += "," + part
        else:
            paths.append(part)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--tokens", default="1,8,32,128,512,2048")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated, e.g. nccl,triton_symm/lamport@split=2,warps=4")
    p.add_argument("--lamport-sweep", action="store_true",
                   help="time the Lamport kernel at splits 1,2,4,8 x warps 4,8,16 beside FlashInfer's one-shot")
    p.add_argument("--out")
    a = p.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    if a.lamport_sweep:
        paths = [f"triton_symm/lamport@split={s},warps={w}" for s in (1, 2, 4, 8) for w in (4, 8, 16)]
        paths.append("flashinfer/oneshot")
    else:
        paths = split_paths(a.paths)
    rows = run_ranks(worker, a.world, a.hidden, tokens, paths, device="cuda", timeout_s=500)[0]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    print(f"TP{a.world} hidden {a.hidden} bf16, us per call (CUDA graph, max over ranks)")
    print("tokens".rjust(7) + "".join(p[-18:].rjust(20) for p in paths))
    for n in tokens:
        cells = []
        for p_ in paths:
            r = next(r for r in rows if r["path"] == p_ and r["tokens"] == n)
            cells.append(("%.2f" % r["us"]) if r["us"] is not None else "-")
        print(str(n).rjust(7) + "".join(c.rjust(20) for c in cells))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"world": a.world, "hidden": a.hidden, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
