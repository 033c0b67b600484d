"""Time the e2e model's decode attention on one GPU: SDPA against the split-KV Triton kernel under several launch
settings (cache positions per step, warps, programs per SM), at one TP4 rank of llama3-70b (16 query / 2 KV
heads of 128, cache 1024, bf16). 80 layers' worth of distinct caches per CUDA graph (so L2 holds none of them),
20 replays, µs per call; every setting is first checked against float64 at two positions.

Usage: python3 bench/decode_attention_sweep.py [--batches 1,8,32,64] [--out sweep.json]
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arfuse.models import decode_attention as da  # noqa: E402
from arfuse.models import llama  # noqa: E402
from arfuse.models.generate import rel_err  # noqa: E402
from tests._decode_ref import decode_inputs, reference_decode  # noqa: E402

HEADS, KV_HEADS, LENGTH, HEAD_DIM, LAYERS = 16, 2, 1024, 128, 80
SETTINGS = [dict(BLOCK_N=b, NUM_WARPS=w, WAVES=v) for b, w, v in itertools.product((32, 64, 128), (4, 8), (2, 4))]


def graph_us(fn, layers, pos) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for q, k, v, mask in layers[:2]:
            fn(q, k, v, pos, mask)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for q, k, v, mask in layers:
            fn(q, k, v, pos, mask)
    for _ in range(3):
        graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / (20 * len(layers))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    defaults = {k: getattr(da, k) for k in ("BLOCK_N", "NUM_WARPS", "WAVES")}
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        pos = torch.tensor([LENGTH - 1], device=dev)
        mask = llama.decode_mask(LENGTH, pos, dev, torch.bfloat16)
        layers = [decode_inputs(batch, HEADS, KV_HEADS, LENGTH, HEAD_DIM, torch.bfloat16, dev, seed=i) + (mask,)
                  for i in range(LAYERS)]
        q, k, v, _ = layers[0]
        refs = {p_: reference_decode(q.cpu(), k.cpu(), v.cpu(), p_) for p_ in (LENGTH - 1, 300)}
        row = {"batch": batch, "sdpa": graph_us(llama.sdpa_decode, layers, pos), "triton": {}}
        for setting in SETTINGS:
            for key, value in setting.items():
                setattr(da, key, value)
            errs = []
            for p_, ref in refs.items():
                pos.fill_(p_)
                errs.append(rel_err(da.triton_decode(q, k, v, pos), ref))
            pos.fill_(LENGTH - 1)
            name = "b{BLOCK_N}_w{NUM_WARPS}_v{WAVES}".format(**setting)
            row["triton"][name] = {"us": graph_us(da.triton_decode, layers, pos), "err": max(errs)}
        for key, value in defaults.items():
            setattr(da, key, value)
        rows.append(row)
        best = min(row["triton"].items(), key=lambda kv: kv[1]["us"])
        default = "b{BLOCK_N}_w{NUM_WARPS}_v{WAVES}".format(**defaults)
        print(f"B={batch:3d}  sdpa {row['sdpa']:6.2f} µs  triton default ({default}) "
              f"{row['triton'][default]['us']:6.2f}  best {best[0]} {best[1]['us']:6.2f}  "
              f"worst err {max(r['err'] for r in row['triton'].values()):.1e}", flush=True)
    names = list(rows[0]["triton"])
    print("setting        " + "".join(f"B={r['batch']:<6d}" for r in rows))
    for name in names:
        print(f"{name:15s}" + "".join(f"{r['triton'][name]['us']:<8.2f}" for r in rows))
    if a.out:
        Path(a.out).write_text(json.dumps({"shape": dict(heads=HEADS, kv_heads=KV_HEADS, length=LENGTH,
                                                         head_dim=HEAD_DIM, layers=LAYERS), "rows": rows,
                                           "device": torch.cuda.get_device_name(), "torch": torch.__version__},
                                          indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
