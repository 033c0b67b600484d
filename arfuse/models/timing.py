"""Time to first token (TTFT) and time per output token (TPOT) of a sharded model, measured the way the
project's end-to-end targets are stated.

- TTFT: eager prefill of P tokens at batch 1, median of ``prefill_repeats`` runs after ``prefill_warmup``,
  each started together on all ranks (barrier), wall clock to the end of the GPU work of the slowest rank.
- TPOT: one decode step at batch B with a KV cache of length L (filled with random values, the step at position
  L-1), captured in ONE CUDA graph, mean of ``decode_replays`` replays timed with CUDA events; max over ranks.
  On CPU there are no graphs: the step is timed eagerly by wall clock (:func:`method` says which).

Every function here is collective over ``group`` (call it on every rank with the same arguments).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from arfuse.models import profile
from arfuse.models.llama import Transformer


@dataclass(frozen=True)
class TimingConfig:
    prefill_warmup: int = 1
    prefill_repeats: int = 5
    decode_warmup: int = 3  # eager steps before capture, then as many untimed replays
    decode_replays: int = 20
    seed: int = 0


def method(device: torch.device, config: TimingConfig) -> dict:
    """How the figures were taken, for the JSON record."""
    if device.type == "cuda":
        decode = f"one CUDA graph per decode step, mean of {config.decode_replays} replays (CUDA events)"
    else:
        decode = f"eager decode step (CPU: no CUDA graphs), mean of {config.decode_replays} steps (wall clock)"
    return {"ttft": f"eager prefill, median of {config.prefill_repeats} after {config.prefill_warmup} warm-up",
            "tpot": decode, "ranks": "max over ranks"}


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_together(device: torch.device, group=None) -> None:
    """Finish this rank's queued work, then wait for every rank."""
    _sync(device)
    if _distributed(group):
        dist.barrier(group=group)
        _sync(device)


def max_over_ranks(value: float, device: torch.device, group=None) -> float:
    if not _distributed(group):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def random_tokens(shape, vocab_size: int, seed: int, device) -> torch.Tensor:
    """Token ids from ``seed`` alone, so every rank of a TP group feeds the same ones."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, tuple(shape), generator=g).to(device)


def _device(model: Transformer) -> torch.device:
    return model.lm_head.weight.device


class DecodeStep:
    """One decode step for a (batch, 1) token tensor at a position - or, with ``pos=None``, a prefill of a
    (batch, P) prompt: a CUDA graph on CUDA, eager on CPU.

    Built with the first step's inputs: the warm-up runs at that position, whose KV entries the real step
    rewrites before reading them, so the warm-up leaves no trace. Calling it is collective.
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, pos: Optional[int], warmup: int = 1):
        device = _device(model)
        self.model = model
        self.tokens = tokens.to(device=device, dtype=torch.long).clone()
        self.pos = None if pos is None else torch.tensor([pos], dtype=torch.long, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        if device.type == "cuda":
            self._capture(max(warmup, 1))

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
            for _ in range(warmup):
                self.model(self.tokens, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model(self.tokens, self.pos)

    def __call__(self, tokens: Optional[torch.Tensor] = None, pos: Optional[int] = None) -> torch.Tensor:
        """Run the step (new ``tokens``/``pos`` if given). On CUDA the returned tensor is the graph's static
        output: clone it before the next call."""
        if tokens is not None:
            self.tokens.copy_(tokens)
        if pos is not None:
            if self.pos is None:
                raise ValueError("DecodeStep: a prefill step has no position to set")
            self.pos.fill_(pos)
        if self.graph is None:
            return self.model(self.tokens, self.pos)
        self.graph.replay()
        return self.logits

    def close(self) -> None:
        """Release the graph and its memory pool."""
        self.graph = None
        self.logits = None


@torch.no_grad()
def prefill_samples(model: Transformer, prompt_len: int, config: TimingConfig, group=None) -> List[float]:
    """Each timed prefill of one ``prompt_len``-token prompt, in ms: the slowest rank's time of that repeat.
    Collective."""
    device = _device(model)
    model.setup_caches(1, prompt_len)
    tokens = random_tokens((1, prompt_len), model.args.vocab_size, config.seed + prompt_len, device)
    for _ in range(config.prefill_warmup):
        model(tokens)
    times = []
    for _ in range(config.prefill_repeats):
        start_together(device, group)
        t0 = time.perf_counter()
        model(tokens)
        _sync(device)
        times.append(max_over_ranks((time.perf_counter() - t0) * 1e3, device, group))
    return times


def time_prefill(model: Transformer, prompt_len: int, config: TimingConfig, group=None) -> float:
    """TTFT in ms for one prompt of ``prompt_len`` tokens: the median of :func:`prefill_samples`. Collective."""
    return statistics.median(prefill_samples(model, prompt_len, config, group))


def _replay_ms(step: DecodeStep, replays: int) -> float:
    """Mean ms per replay of ``step``'s CUDA graph, timed with CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        step.graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / replays


def _prefill_step(model: Transformer, prompt_len: int, config: TimingConfig) -> DecodeStep:
    """A warmed-up prefill of one ``prompt_len``-token prompt as a :class:`DecodeStep` (a graph on CUDA).
    Collective."""
    device = _device(model)
    model.setup_caches(1, prompt_len)
    tokens = random_tokens((1, prompt_len), model.args.vocab_size, config.seed + prompt_len, device)
    step = DecodeStep(model, tokens, None, max(config.prefill_warmup, 1))
    for _ in range(config.prefill_warmup):
        step()
    return step


@torch.no_grad()
def time_prefill_graph(model: Transformer, prompt_len: int, config: TimingConfig, group=None) -> float:
    """TTFT in ms with the prefill captured in one CUDA graph (as :func:`time_decode` times a step): the GPU's
    time without the host's launch overhead, which makes eager TTFT at short prompts noisy. Mean of
    ``decode_replays`` replays, max over ranks. CUDA only. Collective."""
    device = _device(model)
    if device.type != "cuda":
        raise ValueError("time_prefill_graph: CUDA graphs need a CUDA model")
    step = _prefill_step(model, prompt_len, config)
    try:
        start_together(device, group)
        ms = _replay_ms(step, config.decode_replays)
    finally:
        step.close()
    return max_over_ranks(ms, device, group)


def _decode_step(model: Transformer, batch: int, kv_len: int, config: TimingConfig, group=None) -> DecodeStep:
    """A warmed-up decode step at batch ``batch`` and position ``kv_len - 1`` over a random KV cache.
    Collective."""
    device = _device(model)
    model.setup_caches(batch, kv_len)
    rank = dist.get_rank(group) if _distributed(group) else 0
    g = torch.Generator(device=device).manual_seed(config.seed * 7919 + rank)
    for layer in model.layers:
        layer.self_attn.kv_cache.randomize_(g)
    tokens = random_tokens((batch, 1), model.args.vocab_size, config.seed + batch, device)
    step = DecodeStep(model, tokens, kv_len - 1, config.decode_warmup)
    for _ in range(config.decode_warmup):
        step()
    return step


@torch.no_grad()
def time_decode(model: Transformer, batch: int, kv_len: int, config: TimingConfig, group=None) -> float:
    """TPOT in ms for one step at batch ``batch`` attending to ``kv_len`` cached positions. Collective."""
    device = _device(model)
    step = _decode_step(model, batch, kv_len, config, group)
    try:
        start_together(device, group)
        if step.graph is not None:
            ms = _replay_ms(step, config.decode_replays)
        else:
            t0 = time.perf_counter()
            for _ in range(config.decode_replays):
                step()
            _sync(device)
            ms = (time.perf_counter() - t0) * 1e3 / config.decode_replays
    finally:
        step.close()
    return max_over_ranks(ms, device, group)


def _profile_step(step: DecodeStep) -> dict:
    """:func:`profile.breakdown` of one run of ``step``: its graph replay where the profiler sees the graph's
    kernels, else one eager run of the same inputs."""
    device = _device(step.model)
    kernels = profile.kernel_times(step, device)
    source = "graph replay" if step.graph is not None else "eager"
    if not kernels and step.graph is not None:
        kernels, source = profile.kernel_times(lambda: step.model(step.tokens, step.pos), device), "eager"
    return dict(profile.breakdown(kernels), source=source)


@torch.no_grad()
def profile_decode(model: Transformer, batch: int, kv_len: int, config: TimingConfig, group=None) -> dict:
    """Where one decode step's device time goes (:func:`profile.breakdown`), on this rank. Collective."""
    step = _decode_step(model, batch, kv_len, config, group)
    try:
        start_together(_device(model), group)
        return _profile_step(step)
    finally:
        step.close()


@torch.no_grad()
def profile_prefill(model: Transformer, prompt_len: int, config: TimingConfig, group=None) -> dict:
    """Where one prefill's device time goes (:func:`profile.breakdown`), on this rank. Collective."""
    step = _prefill_step(model, prompt_len, config)
    try:
        start_together(_device(model), group)
        return _profile_step(step)
    finally:
        step.close()
