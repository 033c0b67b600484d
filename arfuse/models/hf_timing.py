"""TTFT and TPOT of an HF transformers causal LM (eager, ``torch.compile``d or ``arfuse.compile``d), measured as
:mod:`arfuse.models.timing` measures arfuse's own model, except that nothing is captured in a CUDA graph by
hand (a compiled path may capture its own, e.g. ``mode="reduce-overhead"``):

- TTFT: a prefill of P tokens at batch 1 without a cache, median of ``prefill_repeats`` after
  ``prefill_warmup``, each started together on all ranks, wall clock to the end of the device work; max over
  ranks.
- TPOT: one decode step at batch B on HF's ``DynamicCache`` holding ``kv_len`` tokens (from a prefill of random
  tokens); each step runs on a fresh copy of that cache (copied outside the timed region), mean of
  ``decode_replays`` after ``decode_warmup``; max over ranks.

Collective under TP: call on every rank with the same arguments.
"""
from __future__ import annotations

import copy
import inspect
import statistics
import time
from typing import List

import torch

from arfuse.models.hf import forward
from arfuse.models.timing import TimingConfig, max_over_ranks, random_tokens, start_together


def _device(model) -> torch.device:
    return next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")


def _finish(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    start_together(device)
    t0 = time.perf_counter()
    fn()
    _finish(device)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def prefill_samples(model, prompt_len: int, vocab_size: int, config: TimingConfig, device: torch.device) -> List[float]:
    """TTFT samples (ms, each the max over ranks) of a batch-1 prefill of ``prompt_len`` tokens."""
    ids = random_tokens((1, prompt_len), vocab_size, config.seed, device)
    for _ in range(config.prefill_warmup):
        forward(model, input_ids=ids, use_cache=False)
    return [max_over_ranks(_timed(lambda: forward(model, input_ids=ids, use_cache=False), device), device)
            for _ in range(config.prefill_repeats)]


def cache_keyword(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` from transformers 5.2x (which warns on the old
    name), ``past_key_values`` before (5.17 takes only that)."""
    forward = getattr(model, "_orig_mod", model).forward  # a torch.compile'd module wraps the model
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def time_decode(model, batch: int, kv_len: int, vocab_size: int, config: TimingConfig,
                device: torch.device) -> float:
    """TPOT (ms, max over ranks): the mean decode step at ``batch`` on a cache of ``kv_len`` tokens."""
    keyword = cache_keyword(model)
    prompt = random_tokens((batch, kv_len), vocab_size, config.seed, device)
    # copied out: a CUDA-graph output (mode="reduce-overhead") is overwritten by the graphs' next run
    cache = copy.deepcopy(_returned_cache(forward(model, input_ids=prompt, use_cache=True)))
    token = random_tokens((batch, 1), vocab_size, config.seed + 1, device)
    samples = []
    for i in range(config.decode_warmup + config.decode_replays):
        step = {keyword: copy.deepcopy(cache)}
        ms = _timed(lambda: forward(model, input_ids=token, use_cache=True, **step), device)
        if i >= config.decode_warmup:
            samples.append(ms)
    return max_over_ranks(statistics.mean(samples), device)
