"""``arfuse e2e --model hf:<family>``: TTFT and TPOT of an HF transformers model nobody here wrote, with
transformers' own tensor parallelism, for three paths: ``hf_eager`` (HF TP as is, the reference),
``hf_compile`` (``torch.compile``) and ``arfuse_compile`` (``arfuse.compile``: the same, with the fusion pass).

The model has random weights from a config preset (``tiny`` for CPU, Llama-3-8B/70B shapes for GPUs; ``--layers``
shortens it), saved once as a local checkpoint that every rank loads with transformers' TP (:func:`hf.load`:
``DistributedConfig(tp_size=N)`` on transformers 5, ``tp_plan="auto"`` on 4.x). Each path is checked against the
reference (greedy logits and picks, full recompute, teacher-forced on the reference's tokens), then timed as
:mod:`arfuse.models.hf_timing` describes. Exit 1 if a path disagrees or ``arfuse_compile`` fused nothing at TP>1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
from typing import Dict, Optional, Tuple

PATHS = ("hf_eager", "hf_compile", "arfuse_compile")
REFERENCE = PATHS[0]


@dataclasses.dataclass(frozen=True)
class HFSpec:
    family: str
    preset: str
    layers: Optional[int]
    prompt_lens: Tuple[int, ...]
    batches: Tuple[int, ...]
    kv_len: int
    dtype: str
    device: str
    seed: int
    prefill_repeats: int
    decode_replays: int
    check_steps: int
    check_batch: int = 2
    check_prompt_len: int = 16
    progress: bool = True
    compile_mode: str = "default"

    @property
    def steps_per_path(self) -> int:
        """What one path runs, for the progress bar: the check, then each TTFT and TPOT point."""
        return 1 + len(self.prompt_lens) + len(self.batches)

    @property
    def max_tokens(self) -> int:
        """The fused calls' capacity: the timed calls and the check (the untimed prefill that fills a decode
        cache may be larger: it runs unfused, counted)."""
        return max(max(self.prompt_lens), max(self.batches), self.check_batch * (self.check_prompt_len +
                                                                                  self.check_steps))


def parse_model(text: str) -> str:
    """The family of ``hf:<family>`` (ValueError naming ``--model`` otherwise)."""
    from arfuse.models import hf

    prefix, _, family = text.partition(":")
    if prefix != "hf" or family not in hf.FAMILIES:
        raise ValueError(f"--model must be hf:<family> with family one of {', '.join(hf.FAMILIES)}, got {text!r}")
    return family


RECOMPILE_LIMIT = 64


def _paths(model, spec: HFSpec) -> Dict[str, object]:
    """The three paths. Both compiled ones are dynamic (one graph per call kind, not per size) and share the
    model's ``forward`` code object, whose compiled entries Dynamo caps (8 by default): this tool process raises
    the cap so neither path silently falls back to eager."""
    import torch

    import arfuse

    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    mode = {} if spec.compile_mode == "default" else {"mode": spec.compile_mode}
    return {"hf_eager": model, "hf_compile": torch.compile(model, dynamic=True, **mode),
            "arfuse_compile": arfuse.compile(model, max_tokens=spec.max_tokens, dynamic=True, **mode)}


def _fused_calls(stats) -> int:
    return sum(n for path, n in stats["calls"].items() if not path.startswith("autofuse/"))


def _rank_main(rank: int, world_size: int, spec: HFSpec, checkpoint: str) -> dict:
    """One rank's run (module level, so ``run_ranks`` can spawn it). Collective."""
    import torch

    import arfuse
    from arfuse.cli import output
    from arfuse.models import generate, hf, hf_timing, timing

    device = torch.device("cuda", torch.cuda.current_device()) if spec.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, spec.dtype)
    model = hf.load(checkpoint, dtype=dtype, tp_size=world_size, device=device)
    vocab = model.config.vocab_size
    cfg = timing.TimingConfig(prefill_repeats=spec.prefill_repeats, decode_replays=spec.decode_replays,
                              seed=spec.seed)
    prompt = timing.random_tokens((spec.check_batch, spec.check_prompt_len), vocab, spec.seed, device)
    results: Dict[str, dict] = {}
    ref_logits = ref_tokens = None
    bar = output.progress(len(PATHS) * spec.steps_per_path, f"rank 0 of {world_size}: loading the model",
                          enabled=spec.progress and rank == 0)

    def each(path: str, points, what: str, fn) -> Dict[str, object]:
        return output.each_point(bar, f"rank 0 of {world_size}: {path}: {what}", points, fn)

    with bar, torch.no_grad():
        for name, runner in _paths(model, spec).items():
            bar.set_description(f"rank 0 of {world_size}: {name}: agreement check"
                                + (" (compiling)" if name != REFERENCE else ""))
            before = _fused_calls(arfuse.stats())
            logits, tokens = hf.greedy(runner, prompt, spec.check_steps, forced=ref_tokens)
            check_calls = _fused_calls(arfuse.stats()) - before
            if ref_logits is None:
                ref_logits, ref_tokens = logits, tokens
            bar.update(1)
            samples = each(name, spec.prompt_lens, "TTFT P=",
                           lambda p: hf_timing.prefill_samples(runner, p, vocab, cfg, device))
            tpot = each(name, spec.batches, "TPOT B=",
                        lambda b: hf_timing.time_decode(runner, b, spec.kv_len, vocab, cfg, device))
            check = generate.compare(ref_logits, logits, dtype)
            check["ranks_identical"] = generate.identical_across_ranks(logits)
            check["ok"] = check["ok"] and check["ranks_identical"]
            results[name] = {
                "check": check,
                "ttft_ms": {p: statistics.median(v) for p, v in samples.items()}, "ttft_samples_ms": samples,
                "tpot_ms": tpot, "fused_calls_per_forward": check_calls / spec.check_steps}
    record = {"results": results, "stats": arfuse.stats(), "model": model.config.to_dict(),
              "method": {"ttft": f"prefill without a cache, median of {cfg.prefill_repeats} after "
                                 f"{cfg.prefill_warmup} warm-up (wall clock, max over ranks)",
                         "tpot": f"one decode step on a copy of a {spec.kv_len}-token DynamicCache, mean of "
                                 f"{cfg.decode_replays} after {cfg.decode_warmup} warm-up (wall clock, max over ranks)",
                         "paths": "hf_eager: transformers' TP as is; hf_compile: torch.compile; arfuse_compile: "
                                  "arfuse.compile (the same with arfuse's fusion pass)"}}
    if rank == 0:
        record["report"] = arfuse.compile_report(type(model).__name__)
    return record


def render(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    results = record["results"]
    table = Table(title=f"arfuse e2e: hf:{record['family']} {record['preset']} "
                        f"({record['model']['num_hidden_layers']} layers), TP{record['tp']}, {record['dtype']}, "
                        f"{record['device']}, compile mode {record.get('compile_mode', 'default')}")
    table.add_column("metric")
    for path in results:
        table.add_column(path + (" (ref)" if path == REFERENCE else ""), justify="right")
    for label, key, var in (("TTFT", "ttft_ms", "P"), ("TPOT", "tpot_ms", "B")):
        for point, base in results[REFERENCE][key].items():
            cells = []
            for path in results:
                value = results[path][key][point]
                cells.append(f"{value:.2f} ms" if path == REFERENCE else
                             f"{value:.2f} ms ({(value / base - 1) * 100:+.1f}%)")
            table.add_row(f"{label}, {var}={point}", *cells)
    table.add_row("logits vs ref", *[f"{results[p]['check']['logits_rel_err']:.1e}" for p in results])
    table.add_row("greedy tokens", *[f"{results[p]['check']['tokens_equal']}/{results[p]['check']['tokens']}"
                                     for p in results])
    table.add_row("fused calls / forward", *[f"{results[p]['fused_calls_per_forward']:g}" for p in results])
    table.add_row("check", *["ok" if results[p]["check"]["ok"] else "FAILED" for p in results])
    console = Console()
    console.print(table)
    for key, text in record["method"].items():
        console.print(f"  {key}: {text}")


def run(args, environment, default_preset: Dict[str, str]) -> int:
    """``arfuse e2e --model hf:...`` (``environment()``: the host/software record of ``arfuse e2e``;
    ``default_preset``: the preset per device type when ``--preset`` is not given)."""
    import torch

    from arfuse import launch
    from arfuse.autofuse import CompileReport
    from arfuse.models import hf

    from arfuse.cli import args as args_
    from arfuse.cli.args import UsageError
    device = args_.resolve_device(args.device or "auto")
    compile_mode = args.compile_mode or "default"
    if compile_mode == "reduce-overhead" and device != "cuda":
        raise UsageError(f"--compile-mode reduce-overhead needs CUDA (CUDA graphs); this run is on {device}")
    preset = args.preset or default_preset[device]
    if preset not in hf.PRESETS:
        raise UsageError(f"--preset: with --model, one of {', '.join(hf.PRESETS)}, got {preset!r}")
    try:
        family = parse_model(args.model)
        cfg = hf.config(family, preset, args.layers)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    args_.check_writable("--json", args.json)
    tp = args.tp or (args_.cuda_device_count() if device == "cuda" else 2)
    args_.check_ranks("--tp", tp, device)
    try:
        hf.ep_kwargs(hf.transformers_module(), cfg, tp)  # its ValueError: the experts do not split over --tp
    except ValueError as e:
        raise UsageError(f"--tp {tp}: {e}") from None
    args.preset = preset
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    spec = HFSpec(family, args.preset, args.layers, args.prompt_lens, args.batches, args.kv_len, dtype, device,
                  args.seed, args.prefill_repeats, args.decode_replays, args.check_steps,
                  progress=not args.no_progress, compile_mode=compile_mode)
    with tempfile.TemporaryDirectory(prefix="arfuse-e2e-hf-") as tmp:
        checkpoint = hf.save_random(cfg, os.path.join(tmp, family), seed=args.seed, dtype=getattr(torch, dtype))
        outs = launch.run_ranks(_rank_main, tp, spec, checkpoint, device=device, timeout_s=args.timeout)
    first = outs[0]
    record = dict(environment(), family=family, preset=args.preset, tp=tp, dtype=dtype, device=device,
                  compile_mode=compile_mode,
                  kv_len=args.kv_len, reference=REFERENCE, **first)
    render(record)
    print(CompileReport(record.get("report", {})))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    failed = [p for p, r in record["results"].items() if not r["check"]["ok"]]
    if tp > 1 and not record["results"]["arfuse_compile"]["fused_calls_per_forward"]:
        failed.append("arfuse_compile (fused nothing)")
    if failed:
        print(f"arfuse e2e: paths disagree with {REFERENCE}: {', '.join(failed)}")
        return 1
    return 0
