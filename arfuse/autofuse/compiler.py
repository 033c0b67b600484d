"""``arfuse.compile``: ``torch.compile`` with arfuse's fusion pass installed for that compilation only."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from arfuse.core.requirements import MINIMUM

DEFAULT_MAX_TOKENS = 8192


def _label(model_or_fn) -> str:
    if isinstance(model_or_fn, torch.nn.Module):
        return type(model_or_fn).__name__
    return getattr(model_or_fn, "__qualname__", None) or getattr(model_or_fn, "__name__", None) or repr(model_or_fn)


def _fusion_pass_module():
    try:
        from arfuse.autofuse import graph_pass
    except ImportError as e:  # torch._inductor.custom_graph_pass / pattern_matcher missing or changed
        raise RuntimeError(f"arfuse.compile needs Inductor's CustomGraphPass and pattern matcher (torch >= "
                           f"{MINIMUM['torch']}); this torch {torch.__version__} fails to provide them: {e}") from e
    return graph_pass


def inductor_options(mode: Optional[str], dynamic, options: Optional[dict], fusion_pass) -> dict:
    """The Inductor options of one arfuse compilation: ``mode``'s options (``torch.compile`` takes either a mode
    or options, so the mode is spelled out), then the caller's, then the fusion pass (after the caller's own
    post-grad pass, if any). Inductor's FX graph cache is off unless the caller turns it on: a graph loaded from
    it skips the pass, and so would be missing from :func:`arfuse.compile_report`."""
    merged: dict = {"fx_graph_cache": False}
    if mode is not None:
        if not isinstance(mode, str):
            raise TypeError(f"arfuse.compile: mode must be a str or None, got {type(mode).__name__}")
        from torch._inductor import list_mode_options

        try:
            merged.update(list_mode_options(mode, dynamic))
        except RuntimeError as e:
            raise ValueError(f"arfuse.compile: mode {mode!r} is not one of torch.compile's modes ({e})") from None
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"arfuse.compile: options must be a dict, got {type(options).__name__}")
        merged.update(options)
    theirs = merged.get("post_grad_custom_post_pass")
    if theirs is None:
        merged["post_grad_custom_post_pass"] = fusion_pass
    else:
        merged["post_grad_custom_post_pass"] = _fusion_pass_module().ChainedPass(theirs, fusion_pass)
    return merged


def compile(model_or_fn: Optional[Callable] = None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
            **torch_compile_kwargs: Any):
    """``torch.compile(model_or_fn, **torch_compile_kwargs)`` with arfuse's fusion pass for this compilation.

    In the graphs Inductor compiles, the pass replaces each ``allreduce -> residual add -> RMSNorm`` (and
    ``allreduce -> RMSNorm``, and the same with a static FP8 quantization of the norm's output) with one arfuse
    call; a plain allreduce becomes arfuse's ``all_reduce`` where arfuse has a fast path for it (CUDA). What it
    matches and what it leaves alone, with the reason, is in :func:`arfuse.compile_report`; the fused calls show
    in :func:`arfuse.stats`. Nothing global changes: other ``torch.compile`` calls are unaffected.

    ``max_tokens``: the capacity of the fusion objects the compiled graphs create (one per process group, hidden
    size, dtype and device, collectively, at the graph's first run). A call with more tokens runs the unfused math
    (counted and logged once). ``torch_compile_kwargs``: as for ``torch.compile`` (``fullgraph``, ``dynamic``,
    ``mode``, ``options``; ``backend`` must be ``"inductor"``). Usable as a decorator, with or without arguments.

    Every rank must run the compiled model alike (the same graphs, in the same order), as for any TP model.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"arfuse.compile: max_tokens must be an int, got {type(max_tokens).__name__}")
    if max_tokens <= 0:
        raise ValueError(f"arfuse.compile: max_tokens must be > 0, got {max_tokens}")
    backend = torch_compile_kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise ValueError(f"arfuse.compile: backend must be 'inductor' (the fusion pass runs inside Inductor), "
                         f"got {backend!r}")
    if model_or_fn is None:
        return functools.partial(compile, max_tokens=max_tokens, **torch_compile_kwargs)
    if not callable(model_or_fn):
        raise TypeError(f"arfuse.compile: model_or_fn must be an nn.Module or a callable, got "
                        f"{type(model_or_fn).__name__}")
    fusion_pass = _fusion_pass_module().FusionPass(max_tokens, _label(model_or_fn))
    mode = torch_compile_kwargs.pop("mode", None)
    options = inductor_options(mode, torch_compile_kwargs.get("dynamic"), torch_compile_kwargs.pop("options", None),
                               fusion_pass)
    return torch.compile(model_or_fn, backend="inductor", options=options, **torch_compile_kwargs)
