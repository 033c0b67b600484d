"""Every launch the ``arfuse bench --epilogue`` sweeps can choose, compiled for this GPU, at the hidden sizes they are
swept at: each epilogue launch (rows per tile, warps, CTA cap, evict-first loads) against the float64 reference
into NaN-poisoned outputs, and each MoE finalize launch (a token's row whole or split over CTAs, 1, 4 or 8 slots
per step) at top_k 8 with the shared expert and a bad index in slot 6: the same bits as every other launch, the
index recorded, its row adding nothing. The same float64 check runs before the bench times a launch; this is the
test of record for the launch table's choices (CPU: tests/unit/test_epilogue_interpreted.py)."""
from __future__ import annotations

import pytest
import torch

from arfuse import verify
from arfuse.backends.base import IndexGuard
from arfuse.bench import epilogue as bench
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout
from tests._calls import fused_call

pytestmark = pytest.mark.gpu
HIDDEN = (4096, 5120, 7168, 8192)
EPILOGUE_SPECS = {"residual": FusionSpec(), "ue8m0_norm": FusionSpec(
    quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0, also_norm=True)}
TOKENS = 37  # odd: tiles and the persistent grid end part-way


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("kind", sorted(EPILOGUE_SPECS))
def test_every_swept_epilogue_launch_matches_float64(kind, hidden):
    from arfuse.kernels.nccl_epilogue import rmsnorm_epilogue

    spec = EPILOGUE_SPECS[kind]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = verify.Case(TOKENS, hidden, torch.bfloat16, seed=hidden)
    failed = {}
    for launch in bench.launch_space(hidden, sms):
        call, outputs = fused_call(spec, case, device="cuda")
        rmsnorm_epilogue(call.x, call, spec, launch)
        torch.cuda.synchronize()
        bad = {k: v for k, v in verify.output_errors(spec, case, 1, outputs).items() if not v[0] <= v[1]}
        if bad:
            failed[tuple(launch)] = bad
    assert not failed, failed


@pytest.mark.parametrize("hidden", HIDDEN)
def test_every_swept_moe_launch_gives_the_same_bits_and_guards_a_late_slot(hidden):
    from arfuse.kernels.nccl_epilogue import moe_finalize

    spec = FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True)
    case = verify.Case(TOKENS, hidden, torch.bfloat16, seed=hidden, top_k=8)
    good = case.permuted_idx(0)
    bad = good.clone()
    bad[5, 6] = -1
    ref = verify.Case.rank_input(case, 0, spec).to(torch.bfloat16).cuda()
    runs = {}
    for launch in bench.moe_space(hidden):
        for name, idx in (("good", good), ("bad", bad)):
            guard = IndexGuard(torch.device("cuda"))
            call, _ = fused_call(spec, case, device="cuda", idx=idx)
            out = torch.full((TOKENS, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
            moe_finalize(call, spec, guard.ptr, out, launch)
            torch.cuda.synchronize()
            runs[(launch, name)] = (out, int(guard.host[0]))
    first = bench.moe_space(hidden)[0]
    assert verify.rel_err(runs[(first, "good")][0].double(), ref.double()) <= verify.TOLERANCE[torch.bfloat16]
    for (launch, name), (out, flag) in runs.items():
        assert torch.equal(out.view(torch.int16), runs[(first, name)][0].view(torch.int16)), (launch, name)
        assert flag == (name == "bad"), (launch, name)
    good_out, bad_out = runs[(first, "good")][0], runs[(first, "bad")][0]
    others = torch.ones(TOKENS, dtype=torch.bool)
    others[5] = False
    assert torch.equal(good_out[others], bad_out[others])  # the other tokens are untouched
    scales = case.expert_scales(0).double()
    rows = case.expert_out(0).double()
    without = ref.double()[5] - (rows[good[5, 6].long()] * scales[5, 6]).cuda()  # token 5 without slot 6
    assert verify.rel_err(bad_out[5].double(), without) <= verify.TOLERANCE[torch.bfloat16]
