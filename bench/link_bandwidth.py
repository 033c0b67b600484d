"""Measure this machine's NVLink bandwidth as the kernels see it: every rank reads (pull) or writes (push) a
buffer from/to all peers at once through torch symmetric memory's P2P mappings. Usage: python
bench/link_bandwidth.py WORLD [MiB]. Prints GB/s per GPU, inbound, for pull and push."""
import sys

import torch
import torch.distributed as dist

from arfuse.launch import run_ranks


def worker(rank, world, mib):
    import torch.distributed._symmetric_memory as symm_mem

    dev = torch.device("cuda", torch.cuda.current_device())
    n = mib * (1 << 20) // 2
    buf = symm_mem.empty(world * n, dtype=torch.bfloat16, device=dev)
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    buf.normal_()
    local = torch.empty(world, n, dtype=torch.bfloat16, device=dev)
    peers = [p for p in range(world) if p != rank]
    views = {p: hdl.get_buffer(p, (world, n), torch.bfloat16) for p in peers}
    streams = {p: torch.cuda.Stream() for p in peers}
    results = {}
    for mode in ("pull", "push"):
        for it in range(6):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for p in peers:
                streams[p].wait_event(start)
                with torch.cuda.stream(streams[p]):
                    if mode == "pull":
                        local[p].copy_(views[p][rank])
                    else:
                        views[p][rank].copy_(local[p])
            for p in peers:
                torch.cuda.current_stream().wait_stream(streams[p])
            end.record()
            torch.cuda.synchronize()
            if it >= 2:
                results.setdefault(mode, []).append(start.elapsed_time(end))
    out = {m: len(peers) * n * 2 / (min(v) * 1e-3) / 1e9 for m, v in results.items()}
    return out


def main():
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    res = run_ranks(worker, world, mib, device="cuda", timeout_s=120)
    for r, d in enumerate(res):
        print(f"rank {r}: " + ", ".join(f"{m} {gbs:.0f} GB/s" for m, gbs in d.items()))


if __name__ == "__main__":
    main()
