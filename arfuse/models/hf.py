"""HF transformers causal LMs with random weights, for ``arfuse.compile`` tests and ``arfuse e2e --model hf:...``.

A model is built from a config preset (no download), saved once as a local checkpoint, and loaded either whole or
with transformers' own tensor parallelism (DTensor colwise/rowwise linears and the model's own plan for its
embedding and lm_head): ``distributed_config=DistributedConfig(tp_size=N)`` on transformers 5, ``tp_plan="auto"``
on 4.x (4.57.6, which has no ``DistributedConfig``). ``transformers`` is imported only here, when used: it is
optional at run time.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from arfuse.core import requirements

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}
EXPERTS, TOP_K = 4, 2
_EXPERTS_RULE = re.compile(r"(^|\.)experts(\.|$)")  # a plan rule through ".experts" (not ".shared_experts")


def _moe(family: str, values: dict) -> dict:
    """A MoE family's expert settings for a preset: EXPERTS routed experts, TOP_K per token, every layer sparse
    (Qwen3-MoE's experts a quarter of the preset's MLP width, Mixtral's as wide as it)."""
    if family == "qwen3_moe":
        return dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1, mlp_only_layers=[],
                    moe_intermediate_size=values["intermediate_size"] // 4)
    if family == "mixtral":
        return dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return {}
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def transformers_module():
    """``transformers``, once checked to be a release arfuse supports (RuntimeError in one line otherwise)."""
    requirements.require("transformers")
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("HF models need transformers (pip install 'arfuse[hf]')") from e
    return transformers


def tp_kwargs(transformers, tp_size: int, config=None) -> dict:
    """``from_pretrained``'s arguments for transformers' own TP over the default process group: transformers 5's
    ``DistributedConfig``, or 4.x's ``tp_plan="auto"`` (the world size is the TP size).

    A MoE ``config`` whose TP plan leaves its experts out (transformers >= 5.25 shards experts only by expert
    parallelism) gets ``ep_size=tp_size`` with the ``all_reduce`` implementation: each rank runs its share of the
    experts on the whole batch and the outputs are summed, as a TP serving engine shards them. Without it every
    rank would run every expert, and the experts' allreduce a TP deployment has would not exist."""
    if hasattr(transformers, "DistributedConfig"):
        return {"distributed_config": transformers.DistributedConfig(tp_size=tp_size,
                                                                     **ep_kwargs(transformers, config, tp_size))}
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(f"hf.load: tp_size={tp_size} needs the default process group (tp_plan='auto' shards over it)")
    if dist.get_world_size() != tp_size:
        raise ValueError(f"hf.load: transformers {transformers.__version__} shards over the whole default group "
                         f"(tp_plan='auto'): tp_size must be its size {dist.get_world_size()}, got {tp_size}")
    return {"tp_plan": "auto"}


def ep_kwargs(transformers, config, tp_size: int) -> dict:
    """The ``DistributedConfig`` keywords that shard ``config``'s experts over the ``tp_size`` ranks by expert
    parallelism (see :func:`tp_kwargs`): none where its TP plan shards them or this transformers has no expert
    parallelism. ValueError (one line) if the expert count does not divide by ``tp_size``."""
    extra = {"ep_size": tp_size, "ep_implementation": "all_reduce"}
    if not (hasattr(transformers, "DistributedConfig") and experts_need_ep(config)
            and _accepts(transformers.DistributedConfig, extra)):
        return {}
    experts = next((getattr(config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                    if isinstance(getattr(config, a, None), int)), None)
    if experts is not None and experts % tp_size:
        raise ValueError(f"transformers {transformers.__version__} shards this model's experts only by expert "
                         f"parallelism, and its {experts} experts do not split over {tp_size} ranks: use a TP size "
                         f"that divides {experts}")
    return extra


def _accepts(factory, kwargs: dict) -> bool:
    """Whether ``factory`` takes every keyword of ``kwargs`` (a release without expert parallelism does not)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or all(k in params for k in kwargs)


def experts_need_ep(config) -> bool:
    """Whether ``config``'s experts are sharded only by its expert-parallel plan (no TP rule names them)."""
    if config is None:
        return False
    tp_plan = getattr(config, "base_model_tp_plan", None) or {}
    ep_plan = getattr(config, "base_model_ep_plan", None) or {}
    return not any(map(_EXPERTS_RULE.search, tp_plan)) and any(map(_EXPERTS_RULE.search, ep_plan))


def config(family: str, preset: str = "tiny", layers: Optional[int] = None, **overrides):
    """The transformers config of ``family`` (``llama``, ``qwen2``, ``qwen3_moe``, ``mixtral``) with ``preset``'s
    shapes (MoE families: :data:`EXPERTS` experts, :data:`TOP_K` per token)."""
    if family not in FAMILIES:
        raise ValueError(f"hf.config: family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if preset not in PRESETS:
        raise ValueError(f"hf.config: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ValueError(f"hf.config: layers must be an int >= 1, got {layers!r}")
    values = dict(PRESETS[preset])
    values = dict(values, **_moe(family, values), **overrides)
    if layers is not None:
        values["num_hidden_layers"] = layers
    return getattr(transformers_module(), FAMILIES[family][0])(**values)


def build(cfg, *, seed: int, dtype: torch.dtype = torch.float32, device="cpu", random_norms: bool = False):
    """The whole model of ``cfg`` with transformers' random initialisation under ``seed``, in eval mode.
    ``random_norms``: every RMSNorm weight drawn from U(0.5, 1.5) instead of transformers' ones, so a fused norm
    that applied the wrong weight (or none) would show in the logits."""
    transformers = transformers_module()
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if random_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def save_random(cfg, path: str, *, seed: int, dtype: torch.dtype = torch.float32, random_norms: bool = False) -> str:
    """Build ``cfg``'s model with random weights (see :func:`build`) and save it as a checkpoint in ``path``
    (created)."""
    os.makedirs(path, exist_ok=True)
    build(cfg, seed=seed, dtype=dtype, random_norms=random_norms).save_pretrained(path)
    return path


def load(path: str, *, dtype: torch.dtype = torch.float32, tp_size: int = 1, device=None):
    """The checkpoint in ``path``, whole (``tp_size=1``) or sharded with transformers' TP over the default
    process group (collective: every rank loads it). Eval mode, no gradients."""
    transformers = transformers_module()
    kwargs = {"dtype": dtype}
    if tp_size > 1:
        kwargs["config"] = transformers.AutoConfig.from_pretrained(path)  # read once: the plan and the model's
        kwargs.update(tp_kwargs(transformers, tp_size, kwargs["config"]))
    elif device is not None:
        kwargs["device_map"] = str(device)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval().requires_grad_(False)


def forward(model, **kwargs):
    """``model(**kwargs)`` as one step: under ``torch.compile(mode="reduce-overhead")`` the CUDA graphs of the
    previous call may be overwritten from here on (their outputs must already be copied out, as callers here do)."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()
    return model(**kwargs)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int, forced: Optional[torch.Tensor] = None):
    """``steps`` greedy tokens by full recompute (no KV cache: every step one forward of the whole sequence).

    Returns ``(logits, tokens)``: float32 logits of each step's last position (steps, batch, vocab) on the CPU
    and the picks (steps, batch). ``forced`` (steps, batch) extends the sequence with those tokens instead of the
    model's own picks (teacher forcing: two models compared on the same sequences, so one near-tie that flips a
    pick does not make every later step incomparable). Collective under TP."""
    if forced is not None and tuple(forced.shape) != (steps, prompt.shape[0]):
        raise ValueError(f"hf.greedy: forced must have shape ({steps}, {prompt.shape[0]}), got "
                         f"{tuple(forced.shape)}")
    seq, logits = prompt, []
    for i in range(steps):
        last = forward(model, input_ids=seq, use_cache=False).logits[:, -1].float()
        logits.append(last.cpu())
        fed = forced[i] if forced is not None else last.argmax(-1)
        seq = torch.cat([seq, fed.view(-1, 1).to(seq.device)], dim=1)
    stacked = torch.stack(logits)
    return stacked, stacked.argmax(-1)
