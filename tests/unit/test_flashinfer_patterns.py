"""The FlashInfer mapping of every FusionSpec kind, against fake packages of every recorded release and both API
paths: each kind binds to the right ``AllReduceFusionPattern`` code (or the legacy MoE function) with the right
arguments - the caller's tensors themselves, the group size, ``weight_bias``, ``scale_out`` in FlashInfer's exact
layout, the MoE tensors - or is refused with the expected reason; FlashInfer's own preconditions are refused
before any call; new features stay refused as unverified unless ``ARFUSE_ALLOW_UNVERIFIED=1``.

The expectations are written out by hand from FlashInfer's sources (which release added which member and
parameter; FlashInfer's pattern numbers), not derived from the table under test."""
import math

import pytest
import torch

from arfuse.backends import flashinfer as fib
from arfuse.backends import flashinfer_patterns as fp
from arfuse.backends.base import ALLOW_UNVERIFIED_ENV
from arfuse.backends.flashinfer import FlashInferBackend, flashinfer_scales, guarded_indices, moe_row_reason
from arfuse.backends.flashinfer_workspace import WorkspaceManager
from arfuse.cli.doctor import flashinfer_fusions
from arfuse.core import operands, prepare
from arfuse.core.math import ue8m0_empty
from arfuse.core.spec import CLASSIC_FEATURES, FusionSpec, Prologue, Quant, ScaleLayout, catalogue
from arfuse.core.types import Capacity, FusedCall, GroupCaps, Problem
from arfuse.probe import flashinfer_api as fa
from tests import _records
from tests.unit import fake_flashinfer as ff

BF16 = torch.bfloat16
H = 256
RELEASES = ["0.2.8", "0.2.9", "0.2.11", "0.5.0", "0.6.0", "0.6.7", "0.6.8", "0.6.10", "0.6.10.post1", "0.6.12",
            "0.7.1", "0.7.2.post1", "0.7.4"]
NEVER = "never"
# feature -> (first release arfuse maps it on, a word of the reason before that release)
SINCE = {
    "base": ("0.2.8", ""),
    "fp8_static": ("0.2.9", "host float"),  # 0.2.8 takes the scale as a host float
    "weight_offset": ("0.6.12", "weight_bias"),
    "fp8_per_token": ("0.7.1", "DynamicFP8Quant"),
    "fp8_group": ("0.6.12", "PerTokenGroupFP8PackedQuant"),
    "fp32_group_scales": (NEVER, "only as packed UE8M0"),
    "moe_quant": (NEVER, "mnnvl-cutedsl"),
}
# FlashInfer's own numbers: (moe, quant, layout, also_norm) -> pattern code
CODES = {(False, Quant.NONE, False): 1, (False, Quant.FP8_STATIC, False): 2, (False, Quant.FP8_STATIC, True): 4,
         (False, Quant.FP8_PER_TOKEN, False): 10, (False, Quant.FP8_PER_TOKEN, True): 11,
         (False, Quant.FP8_PER_TOKEN_GROUP, False): 8, (False, Quant.FP8_PER_TOKEN_GROUP, True): 9,
         (True, Quant.NONE, False): 7}


def _features(spec):
    names = ["base"]
    if spec.quant is Quant.FP8_STATIC:
        names.append("fp8_static")
    if spec.weight_offset:
        names.append("weight_offset")
    if spec.quant is Quant.FP8_PER_TOKEN:
        names.append("fp8_per_token")
    if spec.quant is Quant.FP8_PER_TOKEN_GROUP:
        names.append("fp32_group_scales" if spec.scale_layout is ScaleLayout.FP32 else "fp8_group")
    if spec.moe and spec.quant:
        names.append("moe_quant")
    return names


def expected(spec, version):
    """(maps, reason words): the hand-written model of which release maps which spec; a refusal names one of the
    missing features (the kind FlashInfer never offers, if any)."""
    never = [SINCE[f][1] for f in _features(spec) if SINCE[f][0] == NEVER]
    late = [SINCE[f][1] for f in _features(spec)
            if SINCE[f][0] != NEVER and RELEASES.index(version) < RELEASES.index(SINCE[f][0])]
    words = never or late
    return not words, words


def names_one(why, words):
    return not words or any(w in (why or "") for w in words)


def _variants():
    """Every recorded release, as released and (where it has both APIs) with the legacy API only."""
    out = []
    for v in RELEASES:
        out.append((v, None))
        if "allreduce_fusion" in ff.function_names(v):
            out.append((v, ("legacy",)))
    return out


def _caps(p, world=4, sm=(9, 0)):
    return GroupCaps(world_size=world, rank=0, device_type="cuda", sm=sm, p2p=True,
                     facts={"flashinfer": {"flashinfer": p}})


def test_model_covers_every_recorded_release():
    assert ff.versions() == RELEASES


@pytest.mark.parametrize("version, only", _variants())
def test_every_spec_maps_or_is_refused_with_its_reason(tmp_path, monkeypatch, version, only):
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    backend = FlashInferBackend(WorkspaceManager())
    with ff.loaded(ff.write(tmp_path, version, only=only)) as p:
        mapped = 0
        for spec in catalogue():
            maps, word = expected(spec, version)
            why = fp.refusal(spec, p, BF16, 4096)
            assert (why is None) == maps, (spec.name, why)
            assert names_one(why, word), (spec.name, why)
            # the backend's check says the same (a precondition-free shape: 8 tokens, hidden 4096, 4 ranks)
            verdict = backend.check(Problem(spec, 8, 4096, BF16, "cuda", 4), _caps(p), "auto")
            assert verdict == why, (spec.name, verdict, why)
            mapped += maps
        assert mapped == sum(expected(s, version)[0] for s in catalogue()) > 0


@pytest.mark.parametrize("version", ["0.6.12", "0.7.4"])
def test_features_the_record_does_not_vouch_for_are_refused(tmp_path, monkeypatch, version):
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    backend = FlashInferBackend(WorkspaceManager())
    evidence = ("flashinfer/auto", _records.entry("flashinfer/auto", CLASSIC_FEATURES, kind="real_ranks"))
    with _records.installed(monkeypatch, tmp_path, evidence), ff.loaded(ff.write(tmp_path, version)) as p:
        for spec in catalogue():
            why = backend.check(Problem(spec, 8, 4096, BF16, "cuda", 4), _caps(p), "auto")
            if spec.features <= CLASSIC_FEATURES:
                assert why is None, (spec.name, why)
            elif expected(spec, version)[0]:
                assert "not yet verified" in why and ALLOW_UNVERIFIED_ENV in why, (spec.name, why)
            else:
                assert why, spec.name


# -- what each mapped spec passes ----------------------------------------------------------------------------------
SPECS = [FusionSpec(), FusionSpec(weight_offset=True), FusionSpec(residual=False, weight_offset=True),
         FusionSpec(quant=Quant.FP8_STATIC, also_norm=True),
         FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32),
         FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32, also_norm=True, weight_offset=True),
         FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0),
         FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=64, scale_layout=ScaleLayout.UE8M0, also_norm=True),
         FusionSpec(residual=False, quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0),
         FusionSpec(prologue=Prologue.MOE_FINALIZE), FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True),
         FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True, weight_offset=True)]
OFFSET = 1.0


def _call(spec, n, scales_dtype=torch.float32):
    """A FusedCall for ``spec`` with distinct tensors (outputs as arfuse allocates them)."""
    made = operands.allocate_all(spec, n, H, BF16, "cpu")
    residual = torch.randn(n, H, dtype=BF16) if spec.residual else None
    kw = dict(residual=residual, weight=torch.randn(H, dtype=BF16), eps=1e-5,
              weight_offset=OFFSET if spec.weight_offset else 0.0, scale=torch.full((1,), 0.25),
              residual_out=made.get("residual_out"), norm_out=made.get("norm_out"), scale_out=made.get("scale_out"))
    if spec.moe:
        rows = 3 * n
        return FusedCall(torch.randn(rows, H, dtype=BF16), made["out"],
                         expert_idx=torch.randint(0, rows, (n, 2), dtype=torch.int32),
                         expert_scales=torch.rand(n, 2).to(scales_dtype),
                         shared=torch.randn(n, H, dtype=BF16) if spec.shared_expert else None, **kw)
    return FusedCall(torch.randn(n, H, dtype=BF16), made["out"], **kw)


def _bound(version, name, args, kwargs):
    return ff.recorded_signature(version, name).bind(*args, **kwargs).arguments


def _check_plain(b, spec, call, ws):
    assert b.get("pattern", b.get("pattern_code")) == CODES[(False, spec.quant, spec.also_norm)]
    assert b.get("input", b.get("allreduce_in")) is call.x
    if spec.residual:
        assert b["residual_in"] is call.residual and b["residual_out"] is call.residual_out
    else:  # the workspace's zero rows in, the residual out to scratch
        assert not b["residual_in"].any() and b["residual_out"].data_ptr() == ws.scratch.data_ptr()
    assert b["rms_gamma"] is call.weight and b["rms_eps"] == call.eps
    assert b["quant_out"] is (call.out if spec.quant else None)
    assert b["norm_out"] is (call.norm_out if spec.also_norm else None if spec.quant else call.out)
    assert b["scale_factor"] is (call.scale if spec.quant is Quant.FP8_STATIC else None)
    assert b["scale_out"] is (call.scale_out if spec.dynamic_scale else None)
    if spec.quant is Quant.FP8_PER_TOKEN_GROUP:
        assert b["block_quant_group_size"] == spec.group_size
    else:
        assert "block_quant_group_size" not in b
    if spec.weight_offset:
        assert b["weight_bias"] == OFFSET


def _check_moe(b, spec, call, ws, legacy):
    if legacy:
        assert b["allreduce_in"] is call.x and b["norm_weight"] is call.weight and b["eps"] == call.eps
        assert b["workspace_ptrs"] is ws.handle.workspace_tensor and b["launch_with_pdl"] is False
        assert (b["world_size"], b["world_rank"]) == (ws.handle.world, ws.handle.rank)
        assert b.get("backend", "trtllm") == "trtllm" and b.get("routed_scaling_factor") is None
    else:
        assert b["pattern"] == CODES[(True, Quant.NONE, False)] and b["input"] is call.x
        assert b["workspace"] is ws.handle.workspace
        assert b["rms_gamma"] is call.weight and b["rms_eps"] == call.eps
        assert b.get("moe_finalize_backend", "trtllm") == "trtllm" and b["trigger_completion_at_end"] is True
    assert b["residual_in"] is call.residual and b["residual_out"] is call.residual_out and b["norm_out"] is call.out
    assert b["expanded_idx_to_permuted_idx"] is call.expert_idx  # FlashInfer's t*top_k+k = arfuse's [t, k]
    assert b["shared_expert_output"] is (call.shared if spec.shared_expert else None)
    assert b.get("quant_out") is None and b.get("scale_out") is None
    if spec.weight_offset:
        assert b["weight_bias"] == OFFSET


@pytest.mark.parametrize("version, only", _variants())
def test_each_mapped_spec_binds_with_its_arguments(tmp_path, monkeypatch, version, only):
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    with ff.loaded(ff.write(tmp_path, version, only=only)) as p:
        backend = FlashInferBackend(WorkspaceManager())
        ws = backend.prepare(Capacity(16, H, BF16, torch.device("cpu")), _caps(p), object())
        legacy = ws.handle.path == fa.LEGACY
        ran = 0
        for spec in SPECS:
            if not expected(spec, version)[0]:
                with pytest.raises(RuntimeError, match="cannot run here"):
                    backend.run(ws, "auto", spec, _call(spec, 5))
                continue
            call = _call(spec, 5, scales_dtype=BF16)  # scales already in the input dtype: passed as they are
            backend.run(ws, "auto", spec, call)
            name, args, kwargs = ff.calls()[-1]
            want = fa.LEGACY_MOE if spec.moe and legacy else fa.FUNCTIONS[ws.handle.path][1]
            assert name == want, spec.name
            b = _bound(version, name, args, kwargs)
            (_check_moe(b, spec, call, ws, legacy) if spec.moe else _check_plain(b, spec, call, ws))
            if spec.moe:
                assert b["expert_scale_factor"] is call.expert_scales
            ran += 1
        assert ran == sum(expected(s, version)[0] for s in SPECS)
        ws.close()
        backend.free_idle()


@pytest.mark.parametrize("version", ["0.2.8", "0.7.4"])
def test_moe_expert_scales_are_passed_in_the_input_dtype(tmp_path, version):
    spec = FusionSpec(prologue=Prologue.MOE_FINALIZE)
    with ff.loaded(ff.write(tmp_path, version)) as p:
        backend = FlashInferBackend(WorkspaceManager())
        ws = backend.prepare(Capacity(16, H, BF16, torch.device("cpu")), _caps(p), object())
        call = _call(spec, 4, scales_dtype=torch.float32)
        backend.run(ws, "auto", spec, call)
        name, args, kwargs = ff.calls()[-1]
        scales = _bound(version, name, args, kwargs)["expert_scale_factor"]
        assert scales.dtype == BF16 and torch.equal(scales, call.expert_scales.to(BF16))  # FlashInfer reads T
        ws.close()
        backend.free_idle()


# -- layouts and guards --------------------------------------------------------------------------------------------
def test_ue8m0_layout_is_flashinfer_s_exactly():
    for tokens in range(1, 10):
        for groups in range(1, 10):
            t = ue8m0_empty(tokens, groups, "cpu")
            # FlashInfer's allreduce_fusion check: shape (T, ceil(G/4)), strides (1, T padded to 4), int32
            assert tuple(t.shape) == (tokens, math.ceil(groups / 4))
            assert t.stride() == (1, (tokens + 3) // 4 * 4) and t.dtype == torch.int32
            spec = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=1, scale_layout=ScaleLayout.UE8M0)
            assert flashinfer_scales(t, spec) is t


def test_a_valid_scale_tensor_with_another_unit_stride_gets_flashinfer_s_strides():
    spec = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0)
    t = torch.zeros(5, 1, dtype=torch.int32)  # contiguous: stride (1, 1); arfuse accepts it (one pack column)
    cap = Capacity(8, 128, BF16, torch.device("cpu"))
    assert prepare.check_output("op", operands.outputs(spec)[-1], spec, t, 5, cap) is t
    view = flashinfer_scales(t, spec)
    assert view.stride() == (1, 8) and view.data_ptr() == t.data_ptr() and view.shape == t.shape
    view[3, 0] = 7
    assert t[3, 0] == 7  # the same memory
    per_token = FusionSpec(quant=Quant.FP8_PER_TOKEN, scale_layout=ScaleLayout.FP32)
    s = torch.empty(5, 1)
    assert flashinfer_scales(s, per_token) is s


class _Guard:
    def __init__(self):
        self.seen = []

    def record(self, bad):
        self.seen.append(bad.clone())


def test_out_of_range_moe_indices_become_minus_one_and_are_recorded():
    spec = FusionSpec(prologue=Prologue.MOE_FINALIZE)
    call = _call(spec, 3)
    call.expert_idx = torch.tensor([[0, 8], [-1, 2], [9, -5]], dtype=torch.int32)  # 9 rows of expert_out
    ws = type("WS", (), {"index_guard": _Guard()})()
    safe = guarded_indices(ws, call)
    assert safe.dtype == torch.int32 and safe.tolist() == [[0, 8], [-1, 2], [-1, -1]]
    assert ws.index_guard.seen[0].tolist() == [[False, False], [True, False], [True, True]]
    ws.index_guard = None  # CPU workspaces: validation already refused such indices
    assert guarded_indices(ws, call) is call.expert_idx


def test_moe_row_limit_of_releases_before_0_6_15(tmp_path):
    rows = fib.adapter.MAX_COMM_SIZE // (H * 2 * 4) + 1
    with ff.loaded(ff.write(tmp_path, "0.6.12")) as old, ff.loaded(ff.write(tmp_path, "0.7.4")) as new:
        assert "counts the permuted rows" in moe_row_reason(old, rows, H, 4)
        assert moe_row_reason(old, rows - 1, H, 4) is None and moe_row_reason(new, rows, H, 4) is None
    # refused in check, when the call is planned (tests/unit/test_refusal_at_planning.py): run has no refusal


# -- FlashInfer's preconditions, refused in check ------------------------------------------------------------------
def test_group_fp8_cta_limit():
    # bf16: 8 elements per thread; a CTA widens until it holds whole groups, up to a whole row
    assert fp.group_block_threads(4096, 2, 128) == 128 and fp.group_block_threads(16384, 2, 8192) == 1024
    assert fp.group_block_threads(16384, 2, 16384) == 2048 and fp.group_block_threads(12288, 2, 6144) == 768
    assert fp.group_block_threads(12288, 2, 4096) == 1536 and fp.group_block_threads(8192, 4, 8192) == 2048

    def why(hidden, group, dtype=BF16):
        spec = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=group, scale_layout=ScaleLayout.UE8M0)
        return fp.dtype_reason(spec, dtype, hidden)

    assert why(16384, 8192) is None and why(12288, 6144) is None and why(4096, 4096) is None
    assert "2048 threads" in why(16384, 16384) and "1536 threads" in why(12288, 4096)
    assert "2048 threads" in why(8192, 8192, torch.float32) and why(8192, 4096, torch.float32) is None
    assert "does not divide" in why(4100, 128)  # FlashInfer raises for it; arfuse's validation refuses it too


def test_moe_preconditions(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    backend = FlashInferBackend(WorkspaceManager())
    moe = FusionSpec(prologue=Prologue.MOE_FINALIZE)
    with ff.loaded(ff.write(tmp_path, "0.7.4")) as p:
        def why(tokens=8, dtype=BF16, variant="auto", hidden=4096, world=4, caps=None):
            return backend.check(Problem(moe, tokens, hidden, dtype, "cuda", world), caps or _caps(p), variant)

        assert why() is None and why(variant="oneshot") is None
        assert "float16/bfloat16 only" in why(dtype=torch.float32)
        assert "one-shot only" in why(variant="twoshot")
        # without arfuse's per-call byte cap, FlashInfer's one-shot Lamport limit bounds MoE at every variant
        monkeypatch.setattr(fib, "MAX_BYTES", {})
        limit = fib.adapter.MAX_COMM_SIZE // (4 * 4096 * 2)
        assert why(tokens=limit) is None and "2 GiB" in why(tokens=limit + 1)
        for variant in backend.variants:
            flags = [why(tokens=n, variant=variant) is not None for n in range(1, 2 * limit, limit // 40)]
            assert flags == sorted(flags), variant  # monotone in tokens


# -- doctor --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", RELEASES)
def test_doctor_rows_per_release(tmp_path, version):
    with ff.loaded(ff.write(tmp_path, version)) as p:
        rows = flashinfer_fusions(p)
    assert len(rows) == 10
    for name, how in rows.items():
        spec = next(s for s in [*catalogue(), FusionSpec(weight_offset=True)] if s.name == name)
        maps, word = expected(spec, version)
        assert how.endswith(("(unified)", "(legacy)")) == maps, (name, how)
        assert names_one(how, word), (name, how)
    moe = rows["moe_finalize+residual_rmsnorm"]
    assert moe.startswith("kMoEFinalizeARResidualRMSNorm (unified)" if "allreduce_fusion" in ff.function_names(
        version) and version not in ("0.6.0", "0.6.7") else "trtllm_moe_finalize_allreduce_fusion (legacy)")

