"""Reliability on GPUs, with the real backends. Set ARFUSE_RESULTS_DIR to keep each test's figures (cases,
replays, faults injected and survived, hangs, wrong results, worst error) as reliability_gpu_*.json.

(a) One rank fails to set up triton_symm - its symmetric-memory allocation raises out-of-memory on rank 1, or its
    workspace raises on rank 1 after every collective of the setup ran - so every rank drops triton_symm together
    (named and auto), names rank 1, and stays correct; strict mode raises FallbackError on every rank. 2 GPUs.
(b) Peer never arrives: rank 1 is killed (``os._exit``) right before a call, for each triton_symm variant; rank 0
    raises PeerTimeoutError naming the op and rank 1 within the bound (``timeout_s=2``), closes, and its process
    exits 0. 2 GPUs.
(c) Long run: 10,000 CUDA-graph replays per backend (each triton_symm variant, nccl, and flashinfer when its probe
    says it is available) with fresh random inputs generated on the GPU and copied in each time; every replay
    checked against a float64 reference computed on the GPU from an all_gather of the inputs, and bitwise
    identical across ranks (per-replay checksums, compared in one batch at the end). All GPUs (up to 4).
(d) Lifecycle: 200 create/call/close cycles per backend; after a first warm-up cycle (kernel modules, NCCL
    buffers, torch's symmetric-memory signal pads and caches are allocated once and kept), live tensor memory
    (torch.cuda.memory_allocated), free device memory (torch.cuda.mem_get_info) within 2 MiB (allocator
    granularity), file descriptors and threads must return to their values. What the warm-up cycle keeps is
    reported, not bounded. All GPUs (up to 4).

About 4-5 minutes on 4 H200s: (a) 2 launches, (b) 4 launches, (c) and (d) one launch each.
"""
from __future__ import annotations

import gc
import os
import queue
import threading
import time
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arfuse import AllReduceFusion, FallbackError, Pattern, PeerTimeoutError
from arfuse.kernels.launch_config import OP_NAMES
from arfuse.launch import free_port, init_rank, run_ranks
from arfuse.probe import vote
from arfuse.testing import save_figures
from arfuse.testing.faults import InjectedFault, raising_on_ranks
from arfuse.verify import TOLERANCE, Case, checked_call, reference, rel_err

BF16 = torch.bfloat16
FAILING_RANK = 1
SYMM_VARIANTS = ("lamport", "one_shot", "two_shot", "lamport_two_shot")
OP_OF = {"lamport": OP_NAMES[1], "one_shot": OP_NAMES[2], "two_shot": OP_NAMES[3], "lamport_two_shot": OP_NAMES[4]}
PEER_TIMEOUT_S = 2.0
REPLAYS, REPLAY_TOKENS, REPLAY_HIDDEN = 10_000, 64, 4096
CYCLES = 200
MIB = 1 << 20
MEMORY_SLACK = 2 * MIB  # allocator granularity


def _world() -> int:
    return min(4, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _figures(**kw) -> dict:
    base = dict(cases=0, replays=0, faults_injected=0, faults_survived=0, hangs=0, wrong_results=0, worst_error=None)
    return {**base, **kw}


def _flashinfer_available() -> bool:
    from arfuse.probe.flashinfer_api import probe

    return bool(probe().available)


# -- (a) one rank fails to set up triton_symm -----------------------------------------------------------------------

def _checked_calls(fusion, rank: int, world: int, seed: int) -> List[dict]:
    """Every pattern at a few sizes into NaN-poisoned outputs, against the reference, compared across ranks."""
    dev, records = _device(), []
    for i, (pattern, tokens) in enumerate((p, t) for p in Pattern for t in (1, 17, 256)):
        c = checked_call(fusion, pattern, Case(tokens, 4096, BF16, seed + i), rank, world, dev)
        same = len(set(vote.all_gather_object(c.digest))) == 1
        records.append(dict(pattern=pattern.name, tokens=tokens, path=fusion.plan(pattern, tokens).key,
                            err=max(c.err, c.err_residual), identical=same, ok=c.within_tolerance and same))
    return records


def _construct(requested: str, strict: bool):
    t0 = time.monotonic()
    try:
        fusion = AllReduceFusion(max_tokens=256, hidden_size=4096, dtype=BF16, device=_device(), backend=requested,
                                 strict=strict)
    except FallbackError as e:
        return None, ("FallbackError", e.backend, e.reason), time.monotonic() - t0
    return fusion, None, time.monotonic() - t0


def prepare_fault_worker(rank, world, point):
    import torch.distributed._symmetric_memory as symm_mem
    from arfuse.backends.symm_workspace import SymmWorkspace

    if point == "alloc":
        patch = raising_on_ranks(symm_mem, "empty", rank, {FAILING_RANK},
                                 torch.OutOfMemoryError("injected: CUDA out of memory"))
    else:
        patch = raising_on_ranks(SymmWorkspace, "__init__", rank, {FAILING_RANK},
                                 InjectedFault("injected: workspace check failed"), after=True)
    out = {}
    with patch:
        for requested in ("triton_symm", "auto"):
            fusion, _, seconds = _construct(requested, strict=False)
            out[requested] = dict(seconds=seconds, disabled=fusion.disabled, backends=fusion.backends,
                                  records=_checked_calls(fusion, rank, world, 100), stats=dict(fusion.stats()))
            fusion.close()
            _, error, seconds = _construct(requested, strict=True)
            with AllReduceFusion(max_tokens=256, hidden_size=4096, dtype=BF16, device=_device(),
                                 backend="torch_ref") as after:  # the group is still in step
                out[requested]["strict"] = dict(error=error, seconds=seconds,
                                                after=_checked_calls(after, rank, world, 200)[:3])
    return out


def _judge_prepare(per_rank, requested: str, mode: str, error_type: str) -> List[str]:
    """Problems of one scenario (``mode``: lenient or strict); empty: the fault was survived."""
    problems, reasons = [], set()
    for rank, r in enumerate(per_rank):
        got = r[requested]
        if mode == "strict":
            error = got["strict"]["error"]
            if error is None or error[1] != "triton_symm" or f"rank {FAILING_RANK}: {error_type}" not in error[2]:
                problems.append(f"rank {rank}: strict construction gave {error}")
            problems += [f"rank {rank}: after the strict failure: {c}" for c in got["strict"]["after"] if not c["ok"]]
            if got["strict"]["seconds"] > 60:
                problems.append(f"rank {rank}: strict construction took {got['strict']['seconds']:.1f} s")
            continue
        reason = got["disabled"].get("triton_symm", "")
        reasons.add(reason)
        if f"rank {FAILING_RANK}: {error_type}" not in reason or "triton_symm" in got["backends"]:
            problems.append(f"rank {rank}: disabled {got['disabled']}, backends {got['backends']}")
        if not any(f"rank {FAILING_RANK}" in k for k in got["stats"]["fallbacks"]):
            problems.append(f"rank {rank}: fallback not counted: {got['stats']}")
        if any(k.startswith("triton_symm") for k in got["stats"]["calls"]):
            problems.append(f"rank {rank}: triton_symm ran: {got['stats']['calls']}")
        problems += [f"rank {rank}: {c}" for c in got["records"] if not c["ok"]]
        if got["seconds"] > 60:
            problems.append(f"rank {rank}: construction took {got['seconds']:.1f} s")
    if len(reasons) > 1:
        problems.append(f"ranks report different reasons: {reasons}")
    return problems


@pytest.mark.gpu(min_gpus=2)
@pytest.mark.parametrize("point, error_type", [("alloc", "OutOfMemoryError"), ("after", "InjectedFault")])
def test_triton_symm_setup_failing_on_one_rank_falls_back_together(point, error_type):
    t0, hung = time.monotonic(), 0
    try:
        per_rank = run_ranks(prepare_fault_worker, 2, point, device="cuda", timeout_s=240)
    except TimeoutError:
        hung = 1
        raise
    finally:
        if hung:
            save_figures(f"gpu_prepare_fault_{point}", _figures(faults_injected=4, hangs=1))
    verdicts = {f"{req}, {mode}": _judge_prepare(per_rank, req, mode, error_type)
                for req in ("triton_symm", "auto") for mode in ("lenient", "strict")}
    records = [c for r in per_rank for req in ("triton_symm", "auto") for c in r[req]["records"]]
    save_figures(f"gpu_prepare_fault_{point}", _figures(
        cases=len(records), faults_injected=len(verdicts), faults_survived=sum(not v for v in verdicts.values()),
        wrong_results=sum(not c["ok"] for c in records), worst_error=max(c["err"] for c in records)),
        {"verdicts": verdicts, "wall_s": time.monotonic() - t0, "per_rank": per_rank})
    problems = [f"{k}: {p}" for k, v in verdicts.items() for p in v]
    assert not problems, "\n".join(problems)


# -- (b) a rank dies right before a call ----------------------------------------------------------------------------

def _rank_main(rank, world, port, device, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        init_rank(rank, world, device)
        results.put((rank, fn(rank, world, *args)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch_with_victim(fn, world: int, victim: int, *args, timeout_s: float = 120.0, device: str = "cuda"):
    """Like ``run_ranks``, but rank ``victim`` may die: returns ({rank: result} of the others, exit codes, whether
    the others failed to report within the bound)."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, device, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out: Dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < world - 1 and time.monotonic() < deadline:
        try:
            rank, value = results.get(timeout=1.0)
            out[rank] = value
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r != victim):
                break  # a survivor died: it raised (its traceback is on stderr)
    for p in procs:
        p.join(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    return out, codes, len(out) < world - 1


def peer_death_worker(rank, world, variant):
    dev = _device()
    f = AllReduceFusion(max_tokens=64, hidden_size=4096, dtype=BF16, device=dev, backend=f"triton_symm/{variant}",
                        strict=True, timeout_s=PEER_TIMEOUT_S)
    case = Case(8, 4096, BF16, seed=5)
    x, res, w = case.x(rank, dev), case.residual(dev), case.weight(dev)
    norm, res_out = f.residual_rmsnorm(x, res, w, case.eps)  # warm up: compiles, and the path really runs
    torch.cuda.synchronize()
    ref, _ = reference(case, world, Pattern.RESIDUAL_RMSNORM)
    warm = dict(err=rel_err(norm, ref), calls=dict(f.stats()["calls"]))
    dist.barrier()
    torch.cuda.synchronize()
    if rank == FAILING_RANK:
        os._exit(17)  # killed: no cleanup, no further call
    t0 = time.monotonic()
    raised = None
    try:
        f.residual_rmsnorm(x, res, w, case.eps)
        torch.cuda.synchronize()
        f.check_health()
    except PeerTimeoutError as e:
        raised = str(e)
    waited = time.monotonic() - t0
    try:
        f.residual_rmsnorm(x, res, w, case.eps)
        again = None
    except PeerTimeoutError as e:
        again = str(e)
    t1 = time.monotonic()
    f.close()
    return dict(warm=warm, raised=raised, waited_s=waited, raised_again=again, close_s=time.monotonic() - t1)


@pytest.mark.gpu(min_gpus=2)
@pytest.mark.parametrize("variant", SYMM_VARIANTS)
def test_killed_peer_raises_peer_timeout_and_survivor_shuts_down(variant):
    t0 = time.monotonic()
    out, codes, hung = launch_with_victim(peer_death_worker, 2, FAILING_RANK, variant, timeout_s=150)
    survivor = out.get(0)
    problems = []
    if hung or survivor is None:
        problems.append(f"rank 0 did not report (exit codes {codes})")
    else:
        op = OP_OF[variant]
        if not (survivor["warm"]["err"] <= TOLERANCE[BF16] and survivor["warm"]["calls"]
                == {f"triton_symm/{variant}": 1}):
            problems.append(f"warm-up call: {survivor['warm']}")
        msg = survivor["raised"] or ""
        if f"the {op} kernel" not in msg or f"rank {FAILING_RANK}" not in msg:
            problems.append(f"PeerTimeoutError naming the {op} kernel and rank {FAILING_RANK} expected: {msg!r}")
        if not survivor["waited_s"] < 2 * PEER_TIMEOUT_S + 5:
            problems.append(f"waited {survivor['waited_s']:.1f} s for a {PEER_TIMEOUT_S} s bound")
        if not survivor["raised_again"]:
            problems.append("the next call did not raise")
        if survivor["close_s"] > 10:
            problems.append(f"close took {survivor['close_s']:.1f} s")
    if codes != [0, 17]:
        problems.append(f"exit codes {codes}, expected [0, 17] (the survivor exits cleanly)")
    save_figures(f"gpu_peer_death_{variant}", _figures(
        cases=1, faults_injected=1, faults_survived=int(not problems), hangs=int(hung)),
        {"survivor": survivor, "exit_codes": codes, "wall_s": time.monotonic() - t0, "problems": problems})
    assert not problems, "\n".join(problems)


# -- (c) 10,000 graph replays per backend -----------------------------------------------------------------------------

def _capture(fusion, x, res, w, out, eps):
    fusion.residual_rmsnorm(x, res.clone(), w, eps, norm_out=out, inplace=True)  # warm up: compile, NCCL setup
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fusion.residual_rmsnorm(x, res, w, eps, norm_out=out, inplace=True)
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def _long_run(backend: str, rank: int, world: int, replays: int, tokens: int, hidden: int) -> dict:
    dev, eps, tol = _device(), 1e-6, TOLERANCE[BF16]
    f = AllReduceFusion(max_tokens=tokens, hidden_size=hidden, dtype=BF16, device=dev, backend=backend, strict=True)
    plan = f.plan("residual_rmsnorm", tokens)
    if plan.fallback:
        f.close()
        return dict(backend=backend, error=f"cannot run: {plan.reason}")
    x, res, out = (torch.empty(tokens, hidden, dtype=BF16, device=dev) for _ in range(3))
    x_new, res_new = torch.empty_like(x), torch.empty_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=torch.Generator(device=dev).manual_seed(7))).to(BF16)
    w64 = w.double()
    x.normal_(generator=torch.Generator(device=dev).manual_seed(rank))
    res.normal_(generator=torch.Generator(device=dev).manual_seed(99))
    graph = _capture(f, x, res, w, out, eps)
    gen_x = torch.Generator(device=dev).manual_seed(10_000 + rank)
    gen_res = torch.Generator(device=dev).manual_seed(20_000)  # the same residual on every rank
    gathered = torch.empty(world * tokens, hidden, dtype=BF16, device=dev)
    position = torch.arange(1, tokens * hidden + 1, device=dev, dtype=torch.int64)  # order-sensitive checksum
    sums = torch.zeros(replays, 2, dtype=torch.int64, device=dev)
    worst, worst_res = torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.float64,
                                                                                       device=dev)
    bad = torch.zeros((), dtype=torch.int64, device=dev)
    t0 = time.monotonic()
    for i in range(replays):
        x_new.normal_(generator=gen_x)
        res_new.normal_(generator=gen_res)
        x.copy_(x_new)
        res.copy_(res_new)
        out.fill_(float("nan"))
        graph.replay()
        dist.all_gather_into_tensor(gathered, x_new)
        s = gathered.view(world, tokens, hidden).double().sum(0) + res_new.double()
        ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w64
        err = (out.double() - ref).norm() / ref.norm()
        err_res = (res.double() - s).norm() / s.norm()
        worst, worst_res = torch.maximum(worst, err), torch.maximum(worst_res, err_res)  # NaN sticks
        bad += ((err <= tol) & (err_res <= tol)).logical_not()  # a NaN error counts as bad
        sums[i, 0] = (out.view(torch.int16).reshape(-1).to(torch.int64) * position).sum()
        sums[i, 1] = (res.view(torch.int16).reshape(-1).to(torch.int64) * position).sum()
    torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    every = torch.empty(world * replays, 2, dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(every, sums)
    mismatched = int((every.view(world, replays, 2) != sums).any(-1).any(0).sum())
    f.check_health()
    stats = dict(f.stats())
    del graph
    f.close()
    return dict(backend=backend, path=plan.key, replays=replays, tokens=tokens, hidden=hidden,
                worst_err=worst.item(), worst_err_residual=worst_res.item(), bad_replays=int(bad),
                mismatched_replays=mismatched, seconds=seconds, stats=stats)


def long_run_worker(rank, world, backends, replays, tokens, hidden):
    results = []
    for backend in backends:
        if backend == "flashinfer" and not _flashinfer_available():
            results.append(dict(backend=backend, skipped="flashinfer probe: not available"))
            continue
        results.append(_long_run(backend, rank, world, replays, tokens, hidden))
    return results


@pytest.mark.gpu(min_gpus=2)
def test_ten_thousand_graph_replays_per_backend_stay_exact_and_identical():
    backends = [f"triton_symm/{v}" for v in SYMM_VARIANTS] + ["nccl", "flashinfer"]
    t0, hung = time.monotonic(), 0
    try:
        per_rank = run_ranks(long_run_worker, _world(), backends, REPLAYS, REPLAY_TOKENS, REPLAY_HIDDEN,
                             device="cuda", timeout_s=400)
    except TimeoutError:
        hung = 1
        raise
    finally:
        if hung:
            save_figures("gpu_long_run", _figures(hangs=1))
    ran = [r for r in per_rank[0] if "replays" in r]
    problems = [f"{r['backend']}: {r['error']}" for r in per_rank[0] if "error" in r]
    for rank, results in enumerate(per_rank):
        for r in results:
            if "replays" not in r:
                continue
            if not (r["worst_err"] <= TOLERANCE[BF16] and r["worst_err_residual"] <= TOLERANCE[BF16]):
                problems.append(f"rank {rank} {r['backend']}: worst error {r['worst_err']}/{r['worst_err_residual']}")
            if r["bad_replays"] or r["mismatched_replays"]:
                problems.append(f"rank {rank} {r['backend']}: {r['bad_replays']} replays out of tolerance, "
                                f"{r['mismatched_replays']} differing across ranks")
            if not r["path"].startswith(r["backend"].split("/")[0]):
                problems.append(f"rank {rank} {r['backend']}: ran {r['path']}")
    wrong = sum(r["bad_replays"] + r["mismatched_replays"] for results in per_rank for r in results if "replays" in r)
    worst = max((max(r["worst_err"], r["worst_err_residual"]) for results in per_rank for r in results
                 if "replays" in r), default=None)
    save_figures("gpu_long_run", _figures(cases=len(ran), replays=sum(r["replays"] for r in ran),
                                          wrong_results=wrong, worst_error=worst),
                 {"world_size": _world(), "wall_s": time.monotonic() - t0, "rank0": per_rank[0]})
    assert {r["backend"] for r in ran} >= {f"triton_symm/{v}" for v in SYMM_VARIANTS} | {"nccl"}, per_rank[0]
    assert not problems, "\n".join(problems)


# -- (d) 200 create/close cycles per backend --------------------------------------------------------------------------

def _resources() -> dict:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return dict(allocated=torch.cuda.memory_allocated(), free=torch.cuda.mem_get_info()[0],
                fds=len(os.listdir("/proc/self/fd")), threads=threading.active_count(),
                tasks=len(os.listdir("/proc/self/task")))


def _lifecycle(backend: str, rank: int, world: int, cycles: int) -> dict:
    dev = _device()
    x = torch.full((16, 4096), float(rank + 1), dtype=BF16, device=dev)
    expected = world * (world + 1) / 2  # exact in bf16
    wrong = torch.zeros((), dtype=torch.int64, device=dev)
    paths = set()

    def cycle():
        nonlocal wrong
        f = AllReduceFusion(max_tokens=256, hidden_size=4096, dtype=BF16, device=dev, backend=backend, strict=True)
        y = f.all_reduce(x)
        wrong += (y != expected).any()
        paths.add(f.plan("allreduce", 16).key)
        f.close()

    start = _resources()
    cycle()
    dist.barrier()
    base = _resources()
    points = []
    for i in range(1, cycles):
        cycle()
        if i % 50 == 0:
            points.append(dict(cycle=i, free=torch.cuda.mem_get_info()[0], fds=len(os.listdir("/proc/self/fd"))))
    dist.barrier()
    end = _resources()
    return dict(backend=backend, cycles=cycles, paths=sorted(paths), wrong_cycles=int(wrong), start=start, base=base,
                end=end, points=points, warmup_kept_mib=(start["free"] - base["free"]) / MIB)


def lifecycle_worker(rank, world, backends, cycles):
    dist.all_reduce(torch.ones(1, device=_device()))  # NCCL's buffers exist before anything is measured
    results = []
    for backend in backends:
        if backend == "flashinfer" and not _flashinfer_available():
            results.append(dict(backend=backend, skipped="flashinfer probe: not available"))
            continue
        results.append(_lifecycle(backend, rank, world, cycles))
    return results


def _judge_lifecycle(rank: int, r: dict) -> List[str]:
    name = f"rank {rank} {r['backend']}"
    base, end = r["base"], r["end"]
    problems = []
    if r["wrong_cycles"]:
        problems.append(f"{name}: {r['wrong_cycles']} cycles returned a wrong sum")
    if not all(p.startswith(r["backend"]) for p in r["paths"]):
        problems.append(f"{name}: ran {r['paths']}")
    for key in ("allocated", "free"):
        if abs(base[key] - end[key]) > MEMORY_SLACK:
            problems.append(f"{name}: {key} memory {base[key] / MIB:.1f} -> {end[key] / MIB:.1f} MiB after "
                            f"{r['cycles'] - 1} cycles")
    for key in ("fds", "threads", "tasks"):  # fewer is fine (a descriptor the warm-up kept, closed later)
        if end[key] > base[key]:
            problems.append(f"{name}: {key} {base[key]} -> {end[key]}")
    return problems


@pytest.mark.gpu(min_gpus=2)
def test_create_close_cycles_return_memory_fds_and_threads():
    t0, hung = time.monotonic(), 0
    try:
        per_rank = run_ranks(lifecycle_worker, _world(), ["triton_symm", "nccl", "flashinfer"], CYCLES,
                             device="cuda", timeout_s=400)
    except TimeoutError:
        hung = 1
        raise
    finally:
        if hung:
            save_figures("gpu_lifecycle", _figures(hangs=1))
    ran = [r for r in per_rank[0] if "cycles" in r]
    problems = [p for rank, results in enumerate(per_rank) for r in results if "cycles" in r
                for p in _judge_lifecycle(rank, r)]
    save_figures("gpu_lifecycle", _figures(cases=sum(r["cycles"] for r in ran) * len(per_rank),
                                           wrong_results=sum(r.get("wrong_cycles", 0) for rs in per_rank for r in rs)),
                 {"world_size": _world(), "wall_s": time.monotonic() - t0, "per_rank": per_rank,
                  "problems": problems})
    assert {r["backend"] for r in ran} >= {"triton_symm", "nccl"}, per_rank[0]
    assert not problems, "\n".join(problems)

