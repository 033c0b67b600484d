"""Which FlashInfer call runs a :class:`~arfuse.core.spec.FusionSpec`, as data read against the probe.

A spec's *kind* (prologue, quantization, scale layout, also-norm) names one ``AllReduceFusionPattern`` member
(:data:`MEMBERS`), or a reason FlashInfer offers none on a ``trtllm`` workspace (:data:`NEVER`); each of its
features may need parameters the installed function must accept (:data:`FEATURE_PARAMS`), probe flags
(:data:`FEATURE_FLAGS`) and dtypes (:data:`FEATURE_DTYPES`). :func:`route` combines them for one API path;
:func:`refusal` says why a spec cannot run on every path a group may use. Nothing here calls FlashInfer.

MoE finalize has no pattern code on the legacy API: it is its own function there (:data:`LEGACY_MOE`, every
release since 0.2.8); on the unified API it is ``allreduce_fusion`` with ``kMoEFinalizeARResidualRMSNorm``.

FlashInfer's per-token-group kernel launch (``allreduce_fusion_kernel_launcher``) widens a CTA until it holds a
whole number of groups and fails when that needs more than 1024 threads; :func:`group_block_threads` mirrors that
rule so arfuse refuses such a (hidden, group size) instead of calling into the error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from arfuse.core.spec import FusionSpec, Quant, ScaleLayout
from arfuse.probe import flashinfer_api as fi_api
from arfuse.probe.flashinfer_api import FlashInferProbe

LEGACY_MOE = fi_api.LEGACY_MOE
MOE_PATTERN = "kMoEFinalizeARResidualRMSNorm"
MOE_FP8_PATTERN = "kMoEFinalizeARResidualRMSNormFP8Quant"

# kind -> member. A kind is (moe, quant, scale layout, also_norm); kinds without a norm are kAllReduce.
MEMBERS: Dict[Tuple[bool, Quant, ScaleLayout, bool], str] = {
    (False, Quant.NONE, ScaleLayout.NONE, False): "kARResidualRMSNorm",
    (False, Quant.FP8_STATIC, ScaleLayout.NONE, False): "kARResidualRMSNormFP8Quant",
    (False, Quant.FP8_STATIC, ScaleLayout.NONE, True): "kARResidualRMSNormOutFP8Quant",
    (False, Quant.FP8_PER_TOKEN, ScaleLayout.FP32, False): "kARResidualRMSNormDynamicFP8Quant",
    (False, Quant.FP8_PER_TOKEN, ScaleLayout.FP32, True): "kARResidualRMSNormOutDynamicFP8Quant",
    (False, Quant.FP8_PER_TOKEN_GROUP, ScaleLayout.UE8M0, False): "kARResidualRMSNormPerTokenGroupFP8PackedQuant",
    (False, Quant.FP8_PER_TOKEN_GROUP, ScaleLayout.UE8M0, True): "kARResidualRMSNormOutPerTokenGroupFP8PackedQuant",
    (True, Quant.NONE, ScaleLayout.NONE, False): MOE_PATTERN,
}
ALLREDUCE_MEMBER = "kAllReduce"

_NO_MOE_QUANT = ("FlashInfer's MoE finalize writes no FP8 on a trtllm workspace in any release (its FP8 pattern "
                 f"{MOE_FP8_PATTERN}, 0.7.2+, runs only on the mnnvl-cutedsl backend, which arfuse never creates: "
                 "it needs NVLink multicast)")
# kinds FlashInfer never runs on a trtllm workspace, in any release: the reason (doctor and fallback logs show it)
NEVER: Dict[Tuple[bool, Quant, ScaleLayout, bool], str] = {
    (False, Quant.FP8_PER_TOKEN_GROUP, ScaleLayout.FP32, False): "FlashInfer writes per-token-group FP8 scales only "
    "as packed UE8M0 (no float32 scale layout)",
    (False, Quant.FP8_PER_TOKEN_GROUP, ScaleLayout.FP32, True): "FlashInfer writes per-token-group FP8 scales only "
    "as packed UE8M0 (no float32 scale layout)",
    **{(True, q, layout, also): _NO_MOE_QUANT
       for q, layout in ((Quant.FP8_STATIC, ScaleLayout.NONE), (Quant.FP8_PER_TOKEN, ScaleLayout.FP32),
                         (Quant.FP8_PER_TOKEN_GROUP, ScaleLayout.FP32), (Quant.FP8_PER_TOKEN_GROUP, ScaleLayout.UE8M0))
       for also in (False, True)},
}

# spec feature -> parameters the called function must accept (weight_bias: 0.6.12+; block_quant_group_size: 0.6.12+
# in the recorded releases; the MoE tensors: unified 0.6.8+, the legacy MoE function always)
FEATURE_PARAMS: Dict[str, Tuple[str, ...]] = {
    "weight_offset": ("weight_bias",),
    "fp8_per_token": ("scale_out",),
    "fp8_group": ("block_quant_group_size", "scale_out"),
    "moe_finalize": ("expanded_idx_to_permuted_idx", "expert_scale_factor"),
    "shared_expert": ("shared_expert_output",),
}
# spec feature -> probe flag it needs, and the reason when the flag is off
FEATURE_FLAGS: Dict[str, Tuple[str, str]] = {
    "fp8_static": ("fp8_scale_tensor", "FP8 scale must be a host float (not graph-safe)"),
}
# spec feature -> the input dtypes FlashInfer's kernel takes for it (others: every dtype the backend supports)
FEATURE_DTYPES: Dict[str, Tuple[frozenset, str]] = {
    "moe_finalize": (frozenset({torch.float16, torch.bfloat16}),
                     "FlashInfer's MoE finalize kernel takes float16/bfloat16 only"),
}
MAX_BLOCK_THREADS = 1024
MAX_CLUSTER = 8  # FlashInfer caps its thread-block clusters at 8 CTAs


@dataclass(frozen=True)
class Route:
    """How one spec runs on one API path: the ``flashinfer.comm`` function, the ``AllReduceFusionPattern`` member
    passed as its pattern code (None: the function takes none) and that member's code."""

    function: str
    member: Optional[str]
    code: Optional[int]


def kind(spec: FusionSpec) -> Tuple[bool, Quant, ScaleLayout, bool]:
    """The table key of ``spec`` (weight offset, residual and shared expert are orthogonal features)."""
    return (spec.moe, spec.quant, spec.scale_layout, spec.also_norm)


def member(spec: FusionSpec) -> Optional[str]:
    """The ``AllReduceFusionPattern`` member that computes ``spec``, or None if FlashInfer has none for it."""
    return MEMBERS.get(kind(spec)) if spec.norm else ALLREDUCE_MEMBER


def _function(spec: FusionSpec, path: str) -> str:
    return LEGACY_MOE if spec.moe and path == fi_api.LEGACY else fi_api.FUNCTIONS[path][1]


def route(spec: FusionSpec, probe: FlashInferProbe, path: str) -> Tuple[Optional[Route], Optional[str]]:
    """``(route, None)`` if ``path``'s installed function runs ``spec``, else ``(None, reason)``. Pure."""
    version = f"flashinfer {probe.version}"
    if spec.norm and kind(spec) in NEVER:
        return None, NEVER[kind(spec)]
    name = member(spec)
    function = _function(spec, path)
    info = probe.functions.get(function)
    if info is None:
        return None, f"{version}: no {function} ({path} API)"
    needs_member = function != LEGACY_MOE
    if needs_member and name not in probe.patterns:
        return None, f"{version}: no {fi_api.PATTERN_CLASS}.{name}"
    missing = [p for f in sorted(spec.features) for p in FEATURE_PARAMS.get(f, ()) if not info.accepts(p)]
    if missing:
        return None, f"{version}: {function} takes no {', '.join(dict.fromkeys(missing))} ({path} API)"
    for feature in sorted(spec.features):
        flag, why = FEATURE_FLAGS.get(feature, (None, ""))
        if flag is not None and not probe.flags(path)[flag]:
            return None, f"{version}: {why}"
    return Route(function, name if needs_member else None, probe.patterns[name] if needs_member else None), None


def paths(probe: FlashInferProbe) -> Tuple[str, ...]:
    """The API paths a group may drive (world and subgroup), each once."""
    return tuple(dict.fromkeys(p for p in (probe.path_for(False), probe.path_for(True)) if p is not None))


def group_block_threads(hidden: int, itemsize: int, group_size: int) -> int:
    """The CTA size FlashInfer's launcher ends with for per-token-group FP8 (it widens CTAs, halving the cluster,
    until one CTA holds whole groups; with a cluster of 1 a CTA holds the whole row)."""
    vec = 16 // itemsize
    per_token = hidden // vec
    cluster = MAX_CLUSTER
    while per_token % cluster and cluster > 1:
        cluster //= 2
    threads = per_token // cluster
    while threads < 128 and cluster >= 2:
        threads, cluster = threads * 2, cluster // 2
    while cluster > 1 and (threads * vec) % group_size:
        threads, cluster = threads * 2, cluster // 2
    return threads


def dtype_reason(spec: FusionSpec, dtype: torch.dtype, hidden: int) -> Optional[str]:
    """Why FlashInfer's kernel for ``spec`` cannot take ``dtype`` inputs of width ``hidden``, or None. Pure."""
    for feature in sorted(spec.features):
        allowed, why = FEATURE_DTYPES.get(feature, (None, ""))
        if allowed is not None and dtype not in allowed:
            return why
    if spec.quant is Quant.FP8_PER_TOKEN_GROUP:
        if hidden % spec.group_size:
            return f"group size {spec.group_size} does not divide hidden size {hidden}"
        itemsize = torch.empty((), dtype=dtype).element_size()
        threads = group_block_threads(hidden, itemsize, spec.group_size)
        if threads > MAX_BLOCK_THREADS:
            return (f"FlashInfer's per-token-group FP8 needs {threads} threads per CTA for hidden {hidden} and "
                    f"group size {spec.group_size} (its limit is {MAX_BLOCK_THREADS})")
    return None


def refusal(spec: FusionSpec, probe: FlashInferProbe, dtype: torch.dtype, hidden: int) -> Optional[str]:
    """Why the installed FlashInfer cannot run ``spec`` on some API path a group may use, or None. Pure."""
    for path in paths(probe):
        _, why = route(spec, probe, path)
        if why is not None:
            return why
    return dtype_reason(spec, dtype, hidden)


def availability(probe: FlashInferProbe, specs) -> Mapping[str, str]:
    """spec name -> ``"<member> (<path>)"`` or the reason it is refused, for ``arfuse doctor`` (dtype-free)."""
    out = {}
    for spec in specs:
        found = [route(spec, probe, p) for p in paths(probe)] or [(None, probe.reason or "no usable API")]
        reasons = [why for _, why in found if why]
        out[spec.name] = reasons[0] if reasons else ", ".join(
            f"{r.member or r.function} ({p})" for (r, _), p in zip(found, paths(probe)))
    return out
