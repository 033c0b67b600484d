"""Every kind of fused call (``core.spec.catalogue``: weight offset, static / per-token / per-token-group FP8 with
float32 and packed UE8M0 scales, the "also write the norm" variants, MoE finalize with and without a shared
expert) through the public ops on 1 to 4 gloo ranks: fresh random inputs per rank, NaN-poisoned outputs, every
output against the float64 reference (FP8 by its dequantized error and the scale formula, UE8M0 by decoding the
packed layout), in place too, and outputs bitwise identical across ranks. Plus the functional forms and the
module with a weight offset.

One launch of 4 processes covers the group sizes: (0,), (0, 1), (0, 1, 2) and the default group of all 4.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from tests._ranks import Record, check_records, exercise_specs, launch

import arfuse
from arfuse import functional as F
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout, catalogue
from arfuse.verify import TOLERANCE, Case, digest, output_errors, reference_outputs, rel_err

GROUPS = ((0,), (0, 1), (0, 1, 2))  # plus the default group of all 4 ranks
WORLD = 4
HIDDEN = 320  # 5 groups of 64: a partly filled last UE8M0 pack
GROUP_SIZE = 64
TOKENS = (1, 6, 32)
MAX_TOKENS = 32
SPECS = catalogue(GROUP_SIZE)


def _functional_and_module(rank, world, group, case):
    """The new ops' functional forms and ``FusedAddRMSNorm(weight_offset=1)``, checked against float64."""
    records = []
    offset_case = Case(case.tokens, case.hidden, case.dtype, case.seed + 1, weight_offset=1.0)
    quant = arfuse.FP8PerTokenGroup(GROUP_SIZE, packed_ue8m0=True)
    spec = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=GROUP_SIZE, scale_layout=ScaleLayout.UE8M0)
    r = F.residual_rmsnorm_quant(case.x(rank), case.residual(), case.weight(), case.eps, quant=quant, group=group)
    errs = output_errors(spec, case, world, {"out": r.quant, "residual_out": r.residual, "scale_out": r.scale})
    records.append(Record(f"functional.residual_rmsnorm_quant tokens={case.tokens} {case.dtype}",
                          {k: e for k, (e, _) in errs.items()}, TOLERANCE[case.dtype], digest(*r[:3]), [],
                          {k: t for k, (_, t) in errs.items()}))
    moe = FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True)
    r = F.moe_finalize_residual_rmsnorm(case.expert_out(rank), case.permuted_idx(rank), case.expert_scales(rank),
                                        case.residual(), case.weight(), case.eps,
                                        shared_expert_out=case.shared_expert_out(rank), group=group)
    ref = reference_outputs(case, world, moe)
    records.append(Record(f"functional.moe_finalize_residual_rmsnorm tokens={case.tokens} {case.dtype}",
                          {"norm": rel_err(r.norm, ref["out"]), "residual": rel_err(r.residual, ref["residual_out"])},
                          TOLERANCE[case.dtype], digest(r.norm, r.residual), []))
    with arfuse.AllReduceFusion(group, max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=case.dtype,
                                device="cpu") as fusion:
        module = arfuse.FusedAddRMSNorm(HIDDEN, offset_case.eps, fusion=fusion, weight_offset=1.0)
        with torch.no_grad():
            module.weight.copy_(offset_case.weight())
            y, res = module(offset_case.x(rank)[None], offset_case.residual()[None])
        ref = reference_outputs(offset_case, world, FusionSpec(weight_offset=True))
        records.append(Record(f"FusedAddRMSNorm weight_offset tokens={case.tokens} {case.dtype}",
                              {"norm": rel_err(y[0], ref["out"]), "residual": rel_err(res[0], ref["residual_out"])},
                              TOLERANCE[case.dtype], digest(y, res), []))
    return records


def _matrix(rank, world, group, seed, dtypes, token_counts=TOKENS):
    records, problems = [], []
    for d, dtype in enumerate(dtypes):
        with arfuse.AllReduceFusion(group, max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=dtype,
                                    device="cpu") as fusion:
            for i, tokens in enumerate(token_counts):
                records += exercise_specs(fusion, Case(tokens, HIDDEN, dtype, seed + 10 * d + i), rank, world,
                                          SPECS)
            stats = fusion.stats()
        calls = sum(2 if s.residual else 1 for s in SPECS) * len(token_counts)
        if stats["calls"] != {"torch_ref": calls} or stats["fallbacks"] or stats["errors"]:
            problems.append(f"{dtype} counters {dict(stats)}, expected {calls} torch_ref calls and nothing else")
        records += _functional_and_module(rank, world, group, Case(TOKENS[1], HIDDEN, dtype, seed + 7))
    F.close_all(group)
    return records, problems


def _matrix_on_groups(rank, world):
    groups = [dist.new_group(list(g)) for g in GROUPS]  # collective: every rank creates every group, in order
    results = {}
    for g, (ranks, group) in enumerate(zip(GROUPS, groups)):
        if rank in ranks:
            results[ranks] = _matrix(dist.get_rank(group), len(ranks), group, 1000 * g, (torch.float32,), TOKENS[:2])
    results["default"] = _matrix(rank, world, None, 50_000, (torch.float32, torch.bfloat16))
    return results


def test_every_spec_on_groups_of_1_to_4_ranks():
    per_rank = launch(_matrix_on_groups, WORLD)
    for key in [*GROUPS, "default"]:
        ranks = range(WORLD) if key == "default" else key
        results = [per_rank[r][key] for r in ranks]
        for r, (_, problems) in zip(ranks, results):
            assert not problems, f"group {key} rank {r}: {problems}"
        checked = check_records([records for records, _ in results], f"group {key}")
        assert checked >= len(SPECS) * 2


def _construct(rank, world):
    try:
        arfuse.AllReduceFusion(max_tokens=8, hidden_size=64, dtype=torch.float32, device="cpu").close()
    except ValueError as e:
        return str(e)
    return "constructed"


def test_allow_unverified_must_agree_across_ranks():
    """It decides which paths plans built later (per spec, on first use) may name, so it is agreed at construction."""
    from arfuse.backends.base import ALLOW_UNVERIFIED_ENV
    from arfuse.launch import run_ranks

    outcomes = run_ranks(_construct, 2, device="cpu", timeout_s=120,
                         rank_env=[{ALLOW_UNVERIFIED_ENV: "1"}, {ALLOW_UNVERIFIED_ENV: "0"}])
    assert all(ALLOW_UNVERIFIED_ENV in o and "differs across ranks" in o for o in outcomes), outcomes
