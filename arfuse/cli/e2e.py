"""``arfuse e2e``: TTFT and per-token latency of a TP Llama-style model for several norm paths, in one launch.

Each rank builds its shard of the model once (same seed on every rank), then for every path: switches the
norms, runs the agreement check (greedy decoding, teacher-forced on the reference path's tokens), times prefill
(TTFT) and decode (TPOT). The reference is ``unfused`` when listed, else the first path. Prints a table with
the change against the reference, writes JSON, and exits 1 if a path disagrees with the reference. By default
it runs a model that finishes on the machine (``tiny`` on CPU, ``llama3-8b`` on GPUs); every flag is checked
before any rank starts, and rank 0 shows on stderr which path and point it is timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple


from arfuse.cli import args as args_, output
from arfuse.cli.args import UsageError

PROG = "arfuse e2e"
COMPILE_MODES = {"eager": "no torch.compile", "pointwise": "rotary + SwiGLU torch.compile'd"}
DECODE_ATTENTION = {"sdpa": "scaled_dot_product_attention", "triton": "split-KV Triton kernel"}
UNFUSED = "unfused"  # arfuse.models.tp.UNFUSED (not imported here: that would import the model at parse time)
DEFAULT_PRESET = {"cpu": "tiny", "cuda": "llama3-8b"}  # each finishes on one device of its kind
HF_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
OWN_MODEL_ONLY = ("backends", "compile", "decode_attention", "rank_shapes_of", "graph_prefill", "profile")
"""The flags of arfuse's own model that an HF model (``--model``) has no use for: an error there, not ignored."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from arfuse.models.llama import PRESETS

    p.add_argument("--model", default=None, metavar="hf:FAMILY",
                   help="an HF transformers model (hf:llama or hf:qwen2, random weights from --preset) with "
                        "transformers' own TP, timed eager, torch.compile'd and arfuse.compile'd (default: arfuse's "
                        "own Llama-style model)")
    p.add_argument("--compile-mode", choices=HF_COMPILE_MODES, default=None,
                   help="with --model: torch.compile's mode for both compiled paths: default, reduce-overhead "
                        "(CUDA graphs; CUDA only) or max-autotune-no-cudagraphs (default: default)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help=f"model shapes: {', '.join(PRESETS)} (default: {DEFAULT_PRESET['cpu']} on CPU, "
                        f"{DEFAULT_PRESET['cuda']} on GPU)")
    p.add_argument("--layers", type=args_.positive_int, default=None,
                   help="override the preset's layer count (default: the preset's)")
    p.add_argument("--tp", type=args_.positive_int, default=None,
                   help="ranks (default: all GPUs, or 2 on CPU; 1 with --rank-shapes-of)")
    p.add_argument("--backends", type=args_.name_list, default=("auto", UNFUSED),
                   help="comma-separated norm paths: auto, unfused, or arfuse backend names or name/variant "
                        "(default: auto,unfused)")
    p.add_argument("--prompt-lens", type=args_.int_list, default=(128, 512, 2048),
                   help="comma-separated TTFT prompt lengths (default: 128,512,2048)")
    p.add_argument("--batches", type=args_.int_list, default=(1, 8, 32, 64),
                   help="comma-separated TPOT decode batches (default: 1,8,32,64)")
    p.add_argument("--kv-len", type=args_.positive_int, default=1024,
                   help="KV length of the timed decode step (default: 1024)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", type=args_.dtype, default=None,
                   help=f"{args_.DTYPE_HELP} (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--graph-prefill", action="store_true",
                   help="also time each prefill captured in a CUDA graph (GPU time without host launch overhead; "
                        "default: off)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="what torch.compile covers, every path alike: eager (nothing) or pointwise (rotary + "
                        "SwiGLU) (default: pointwise on CUDA, eager on CPU)")
    p.add_argument("--decode-attention", choices=DECODE_ATTENTION, default=None,
                   help="decode attention, every path alike: sdpa, or triton (arfuse's split-KV kernel) "
                        "(default: triton on CUDA, sdpa on CPU)")
    p.add_argument("--rank-shapes-of", type=args_.positive_int, default=None, metavar="N",
                   help="one device (--tp 1) with the shapes one rank of a TP-N model computes with, and no "
                        "communication: the floor under every allreduce path of that TP run (default: off)")
    p.add_argument("--profile", action="store_true",
                   help="also record where each timed step's device time goes (kernels by category, rank 0; "
                        "default: off)")
    p.add_argument("--seed", type=args_.non_negative_int, default=0, help="weight and input seed (default: 0)")
    p.add_argument("--prefill-repeats", type=args_.positive_int, default=5,
                   help="timed prefills per prompt length, median taken (default: 5)")
    p.add_argument("--decode-replays", type=args_.positive_int, default=20,
                   help="timed CUDA-graph replays (CPU: eager steps) per decode batch, mean taken (default: 20)")
    p.add_argument("--check-steps", type=args_.positive_int, default=8,
                   help="greedy steps compared between paths (default: 8)")
    p.add_argument("--timeout", type=args_.positive_float, default=1200.0,
                   help="seconds before the ranks are killed (default: 1200)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here (default: not written)")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr (default: shown)")


@dataclasses.dataclass(frozen=True)
class Spec:
    preset: str
    layers: Optional[int]
    paths: Tuple[str, ...]
    prompt_lens: Tuple[int, ...]
    batches: Tuple[int, ...]
    kv_len: int
    dtype: str
    seed: int
    prefill_repeats: int
    decode_replays: int
    check_steps: int
    device: str
    compile: str = "eager"
    decode_attention: str = "sdpa"
    graph_prefill: bool = False
    rank_shapes_of: Optional[int] = None
    profile: bool = False
    check_batch: int = 2
    check_prompt_len: int = 32
    progress: bool = True

    @property
    def reference(self) -> str:
        return "unfused" if "unfused" in self.paths else self.paths[0]

    @property
    def max_tokens(self) -> int:
        return max(max(self.prompt_lens), max(self.batches), self.check_batch * self.check_prompt_len)

    @property
    def steps_per_path(self) -> int:
        """What one path runs, for the progress bar: the check, each TTFT and TPOT point, and the extras."""
        points = len(self.prompt_lens) + len(self.batches)
        return 1 + points + (len(self.prompt_lens) if self.graph_prefill else 0) + (points if self.profile else 0)


def _model_args(spec: Spec):
    from arfuse.models import llama

    args = llama.preset(spec.preset, spec.layers)
    return args if spec.rank_shapes_of is None else llama.rank_shapes(args, spec.rank_shapes_of)


def _device_info(device) -> dict:
    import torch

    from arfuse.launch import MULTICAST_GUARDS

    info = {"type": device.type, "env": {k: os.environ.get(k) for k in MULTICAST_GUARDS}}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), count=torch.cuda.device_count(),
                    capability=list(torch.cuda.get_device_capability(device)))
    return info


def _rank_main(rank: int, world_size: int, spec: Spec) -> dict:
    """One rank's whole run (module level, so ``run_ranks`` can spawn it). Collective."""
    import torch

    from arfuse.models import generate, timing, tp

    device = torch.device("cuda", torch.cuda.current_device()) if spec.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, spec.dtype)
    cfg = timing.TimingConfig(prefill_repeats=spec.prefill_repeats, decode_replays=spec.decode_replays,
                              seed=spec.seed)
    results: Dict[str, dict] = {}
    order = [spec.reference] + [p for p in spec.paths if p != spec.reference]
    bar = output.progress(len(order) * spec.steps_per_path, f"rank 0 of {world_size}: building the model",
                          enabled=spec.progress and rank == 0)

    def each(path: str, points, what: str, fn) -> Dict[str, object]:
        return output.each_point(bar, f"rank 0 of {world_size}: {path}: {what}", points, fn)

    with bar, torch.no_grad():
        args = _model_args(spec)
        model = tp.build(args, seed=spec.seed, dtype=dtype, device=device)
        if spec.compile == "pointwise":
            model.compile_pointwise_()
        model.use_decode_attention_(spec.decode_attention)
        switch = tp.NormSwitch(model, None, tp.TPConfig(max_tokens=spec.max_tokens))
        prompt = timing.random_tokens((spec.check_batch, spec.check_prompt_len), args.vocab_size, spec.seed, device)
        ref_logits = ref_tokens = None
        for path in order:
            bar.set_description(f"rank 0 of {world_size}: {path}: agreement check")
            switch.use(path)
            logits, tokens = generate.greedy(model, prompt, spec.check_steps, forced=ref_tokens)
            if ref_logits is None:
                ref_logits, ref_tokens = logits, tokens
            check = generate.compare(ref_logits, logits, dtype)
            check["ranks_identical"] = generate.identical_across_ranks(logits)
            check["ok"] = check["ok"] and check["ranks_identical"]
            bar.update(1)
            samples = each(path, spec.prompt_lens, "TTFT P=", lambda p: timing.prefill_samples(model, p, cfg))
            ttft = {p: statistics.median(v) for p, v in samples.items()}
            tpot = each(path, spec.batches, "TPOT B=", lambda b: timing.time_decode(model, b, spec.kv_len, cfg))
            graph_ttft = (each(path, spec.prompt_lens, "TTFT (graph) P=",
                               lambda p: timing.time_prefill_graph(model, p, cfg)) if spec.graph_prefill else None)
            plans = {str(n): key for n, key in switch.plans(spec.prompt_lens + spec.batches).items()}
            results[path] = {"ttft_ms": ttft, "ttft_samples_ms": samples, "tpot_ms": tpot, "check": check,
                             "stats": switch.stats(), "plans": plans}
            if graph_ttft is not None:
                results[path]["ttft_graph_ms"] = graph_ttft
            if spec.profile:
                results[path]["profile"] = {
                    "decode": each(path, spec.batches, "profile B=",
                                   lambda b: timing.profile_decode(model, b, spec.kv_len, cfg)),
                    "prefill": each(path, spec.prompt_lens, "profile P=",
                                    lambda p: timing.profile_prefill(model, p, cfg))}
        switch.close()
    method = dict(timing.method(device, cfg), compile=COMPILE_MODES[spec.compile],
                  decode_attention=DECODE_ATTENTION[spec.decode_attention])
    if spec.rank_shapes_of:
        method["shapes"] = (f"one rank's shapes of TP{spec.rank_shapes_of} on one device, no communication: "
                            f"the compute under every allreduce path of that TP run")
    if spec.graph_prefill:
        method["ttft_graph"] = f"prefill captured in one CUDA graph, mean of {cfg.decode_replays} replays"
    return {"results": results, "device": _device_info(device), "method": method, "model": dataclasses.asdict(args)}


def _spread(samples: List[float]) -> float:
    return (max(samples) - min(samples)) / statistics.median(samples) if samples else 0.0


def _cell(value: float, base: Optional[float]) -> str:
    """``"12.34 ms (-5.1%)"``: the value and its change against ``base`` (omitted for the reference)."""
    if base is None or base <= 0:
        return f"{value:.2f} ms"
    return f"{value:.2f} ms ({(value / base - 1) * 100:+.1f}%)"


def render(record: dict) -> None:
    """Print the path x metric table (with the change against the reference) and the agreement check."""
    from rich.table import Table

    console = output.console()
    ref, results = record["reference"], record["results"]
    paths = list(results)
    shapes = f", one rank's shapes of TP{record['rank_shapes_of']}" if record.get("rank_shapes_of") else ""
    table = Table(title=f"arfuse e2e: {record['preset']} ({record['model']['n_layers']} layers{shapes}), "
                        f"TP{record['tp']}, {record['dtype']}, {record['device']['type']}")
    table.add_column("metric")
    for path in paths:
        table.add_column(path + (" (ref)" if path == ref else ""), justify="right")
    rows = [("TTFT", "ttft_ms", "P"), ("TTFT (graph)", "ttft_graph_ms", "P"), ("TPOT", "tpot_ms", "B")]
    for label, key, var in rows:
        for point in results[ref].get(key, {}):
            base = results[ref][key][point]
            cells = [_cell(results[p][key][point], None if p == ref else base) for p in paths]
            table.add_row(f"{label}, {var}={point}", *cells)
    table.add_row("logits vs ref", *[f"{results[p]['check']['logits_rel_err']:.1e}" for p in paths])
    table.add_row("greedy tokens", *[f"{results[p]['check']['tokens_equal']}/{results[p]['check']['tokens']}"
                                     for p in paths])
    table.add_row("check", *["ok" if results[p]["check"]["ok"] else "FAILED" for p in paths])
    console.print(table)
    if record["device"]["type"] == "cpu":
        from arfuse.bench.report import CPU_NOTE

        console.print(f"  {CPU_NOTE}")
    for key, text in record["method"].items():
        console.print(f"  {key}: {text}")
    if any("profile" in r for r in results.values()):
        render_profile(results)
    spread = {p: max(_spread(v) for v in r["ttft_samples_ms"].values()) for p, r in results.items()
              if r.get("ttft_samples_ms")}
    if spread:
        console.print("  ttft spread over the repeats (max-min)/median, worst prompt: "
                        + ", ".join(f"{p} {s:.0%}" for p, s in spread.items()))


def render_profile(results: dict) -> None:
    """One row per path and timed step: the step's wall time, its kernels' summed time and count, and the
    summed time of each kernel category (rank 0)."""
    from rich.table import Table

    from arfuse.models.profile import CATEGORIES, OTHER

    labels = [label for label, _ in CATEGORIES] + [OTHER]
    table = Table(title="where the device time goes (µs per step, rank 0; wall = the timed figure)")
    for column in ("path", "step", "wall", "kernels", "n") + tuple(labels):
        table.add_column(column, justify="left" if column in ("path", "step") else "right")
    for path, r in results.items():
        for kind, wall_key, var in (("decode", "tpot_ms", "B"), ("prefill", "ttft_graph_ms", "P")):
            for point, b in r.get("profile", {}).get(kind, {}).items():
                wall = r.get(wall_key, {}).get(point)
                cats = [f"{b['categories'][label]['us']:.0f}" for label in labels]
                table.add_row(path, f"{kind} {var}={point}", "-" if wall is None else f"{wall * 1e3:.0f}",
                              f"{b['us']:.0f}", str(b["kernels"]), *cats)
    console = output.console(150)
    console.width = max(console.width, 150)  # 13 columns: wider than a log's default 80
    console.print(table)


def _environment() -> dict:
    import torch

    import arfuse

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "arfuse": arfuse.__version__}
    if torch.cuda.is_available() and torch.version.cuda:
        env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    return env


def _spec(args) -> Tuple[Spec, int]:
    """(the run, its rank count), every flag checked (UsageError naming it) before any rank is spawned."""
    from arfuse.models import llama

    if args.compile_mode is not None:
        raise UsageError("--compile-mode applies to an HF model (--model hf:...); arfuse's own model takes --compile")
    device = args_.resolve_device(args.device or "auto")
    args_.check_backends("--backends", args.backends, extra=(UNFUSED,))
    args_.check_writable("--json", args.json)
    tp = args.tp or (1 if args.rank_shapes_of is not None else
                     args_.cuda_device_count() if device == "cuda" else 2)
    if args.rank_shapes_of is not None and tp != 1:
        raise UsageError(f"--rank-shapes-of runs one rank's shapes on one device: it needs --tp 1, got --tp {tp}")
    args_.check_ranks("--tp", tp, device)
    preset = args.preset or DEFAULT_PRESET[device]
    model = llama.preset(preset, args.layers)
    for flag, n in (("--tp", tp), ("--rank-shapes-of", args.rank_shapes_of)):
        if n is not None and n > 1:
            try:
                llama.rank_shapes(model, n)
            except ValueError as e:
                raise UsageError(f"{flag} {n}: the {preset} model cannot be split {n} ways: "
                                 f"{str(e).partition(': ')[2]}") from None
    spec = Spec(preset, args.layers, args.backends, args.prompt_lens, args.batches, args.kv_len,
                args.dtype or ("bfloat16" if device == "cuda" else "float32"), args.seed, args.prefill_repeats,
                args.decode_replays, args.check_steps, device,
                compile=args.compile or ("pointwise" if device == "cuda" else "eager"),
                decode_attention=args.decode_attention or ("triton" if device == "cuda" else "sdpa"),
                graph_prefill=args.graph_prefill, rank_shapes_of=args.rank_shapes_of, profile=args.profile,
                progress=not args.no_progress)
    if spec.graph_prefill and device != "cuda":
        raise UsageError("--graph-prefill needs CUDA (graph capture); this run is on cpu")
    if spec.decode_attention == "triton" and device != "cuda":
        from arfuse.models.decode_attention import interpreted

        if not interpreted():
            raise UsageError("--decode-attention triton needs CUDA (or TRITON_INTERPRET=1); choose sdpa")
    return spec, tp


def _check_hf_flags(args) -> None:
    """UsageError for a flag of arfuse's own model given with ``--model`` (an HF model has no use for it)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    for name in OWN_MODEL_ONLY:
        if getattr(args, name) != defaults.get_default(name):
            raise UsageError(f"--{name.replace('_', '-')} applies to arfuse's own model, not to --model {args.model}")


def run(args) -> int:
    from arfuse import launch

    if getattr(args, "model", None):
        from arfuse.cli import e2e_hf

        _check_hf_flags(args)
        return e2e_hf.run(args, _environment, DEFAULT_PRESET)
    spec, tp = _spec(args)
    if spec.progress:
        output.status(PROG, f"starting {tp} {spec.device} rank{'s' if tp > 1 else ''}: {spec.preset}, paths "
                            f"{', '.join(spec.paths)} ...")
    try:
        outs = launch.run_ranks(_rank_main, tp, spec, device=spec.device, timeout_s=args.timeout)
    except (launch.RankFailed, TimeoutError) as e:
        print(f"{PROG}: FAILED: {output.failure(e, getattr(args, 'verbose', False))}", file=sys.stderr)
        return 1
    first = outs[0]
    record = dict(_environment(), preset=spec.preset, tp=tp, dtype=spec.dtype, reference=spec.reference,
                  kv_len=spec.kv_len, check_steps=spec.check_steps, rank_shapes_of=spec.rank_shapes_of, **first)
    render(record)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    failed = [p for p, r in record["results"].items() if not r["check"]["ok"]]
    if failed:
        print(f"{PROG}: paths disagree with {spec.reference}: {', '.join(failed)}")
        return 1
    return 0
