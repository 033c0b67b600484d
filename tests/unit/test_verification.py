"""The verification record (arfuse/backends/verification.py, verified.json): evidence is tied to the code it
checked, so a change to a path's code takes its verification away, with that reason; the shipped record and the
README's table agree with the code here now."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from arfuse.backends import base, verification
from arfuse.core.spec import CLASSIC_FEATURES, FEATURES, RESIDUAL_RMSNORM, FusionSpec, Quant, ScaleLayout
from arfuse.core.types import GroupCaps, Problem
from tests import _records

REPO = Path(__file__).resolve().parents[2]
SYMM = base.get("triton_symm")
CAPS = GroupCaps(world_size=4, rank=0, device_type="cuda", dist_backend="cpu:gloo,cuda:nccl", sm=(9, 0),
                 single_host=True, p2p=True, facts={"triton_symm": {"symm_mem": True, "triton": True}})
GROUP = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0)


def _problem(spec=RESIDUAL_RMSNORM):
    return Problem(spec, 8, 8192, torch.bfloat16, "cuda", 4)


@pytest.fixture(autouse=True)
def strict_about_verification(monkeypatch):
    monkeypatch.delenv(base.ALLOW_UNVERIFIED_ENV, raising=False)


def test_a_path_without_evidence_is_refused_and_the_flag_runs_it(monkeypatch, tmp_path):
    with _records.installed(monkeypatch, tmp_path):
        why = SYMM.check(_problem(), CAPS, "lamport")
        assert "triton_symm/lamport: never verified on GPUs" in why and base.ALLOW_UNVERIFIED_ENV in why
        assert SYMM.check(_problem(), GroupCaps(**{**CAPS.__dict__, "allow_unverified": True}), "lamport") is None


def test_evidence_vouches_for_its_features_only(monkeypatch, tmp_path):
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport",
                                                    _records.entry("triton_symm/lamport", CLASSIC_FEATURES))):
        assert SYMM.check(_problem(), CAPS, "lamport") is None
        why = SYMM.check(_problem(GROUP), CAPS, "lamport")
        assert "fp8_group, ue8m0 not yet verified on GPUs" in why
        assert "never verified" in SYMM.check(_problem(), CAPS, "one_shot")  # evidence is per variant


def test_evidence_on_other_code_is_stale_and_says_so(monkeypatch, tmp_path):
    stale = _records.entry("triton_symm/lamport", FEATURES, stale=True, date="2026-11-28")
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport", stale)):
        why = SYMM.check(_problem(), CAPS, "lamport")
        assert "its code changed since it was verified (virtual_ranks, 2026-11-28" in why


def test_a_spec_that_failed_is_refused_though_its_features_are_vouched_for(monkeypatch, tmp_path):
    fp8 = FusionSpec(quant=Quant.FP8_STATIC)
    e = dict(_records.entry("triton_symm/lamport", CLASSIC_FEATURES | {"also_norm"}),
             refused={fp8.name: "outputs differ across ranks"})
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport", e)):
        assert "failed its check" in SYMM.check(_problem(fp8), CAPS, "lamport")
        assert SYMM.check(_problem(FusionSpec(quant=Quant.FP8_STATIC, also_norm=True)), CAPS, "lamport") is None


def test_a_failed_run_on_this_code_refuses_the_path_whatever_else_passed(monkeypatch, tmp_path):
    failed = dict(_records.entry("triton_symm/lamport", FEATURES, ok=False), problems=["timeout check failed"])
    passed = _records.entry("triton_symm/lamport", FEATURES)
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport", failed), ("triton_symm/lamport", passed)):
        assert "failed its check on this code (virtual_ranks, 2026-12-07): timeout check failed" in SYMM.check(
            _problem(), CAPS, "lamport")
    record = {"paths": {}}
    verification.add(record, "p", failed)
    verification.add(record, "p", passed)
    assert record["paths"]["p"] == [failed, passed]  # a passing rerun does not erase the failure


def test_evidence_covers_only_the_world_sizes_and_dtypes_it_ran(monkeypatch, tmp_path):
    e = _records.entry("triton_symm/lamport", FEATURES, world_sizes=(2,), dtypes=["bfloat16"])
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport", e)):
        at2 = Problem(RESIDUAL_RMSNORM, 8, 8192, torch.bfloat16, "cuda", 2)
        assert SYMM.check(at2, GroupCaps(**{**CAPS.__dict__, "world_size": 2}), "lamport") is None
        why = SYMM.check(_problem(), CAPS, "lamport")  # 4 ranks
        assert "not yet verified at world size 4 in bfloat16" in why
        assert "(verified: world sizes [2], dtypes ['bfloat16'])" in why
        fp32 = Problem(RESIDUAL_RMSNORM, 8, 8192, torch.float32, "cuda", 2)
        assert "at world size 2 in float32" in SYMM.check(fp32, GroupCaps(**{**CAPS.__dict__, "world_size": 2}),
                                                          "lamport")


def test_evidence_vouches_at_each_world_size_only_for_the_specs_that_ran_there(monkeypatch, tmp_path):
    e = dict(_records.entry("triton_symm/lamport", FEATURES, world_sizes=(2, 8)),
             features_by_world={"2": sorted(FEATURES), "8": sorted(CLASSIC_FEATURES)})
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport", e)):
        for world in (2, 8):
            caps = GroupCaps(**{**CAPS.__dict__, "world_size": world})
            assert SYMM.check(Problem(RESIDUAL_RMSNORM, 8, 8192, torch.bfloat16, "cuda", world), caps, "lamport") is None
        caps = GroupCaps(**{**CAPS.__dict__, "world_size": 8})
        why = SYMM.check(Problem(GROUP, 8, 8192, torch.bfloat16, "cuda", 8), caps, "lamport")
        assert "fp8_group, ue8m0 not yet verified on GPUs" in why
        caps = GroupCaps(**{**CAPS.__dict__, "world_size": 2})
        assert SYMM.check(Problem(GROUP, 8, 8192, torch.bfloat16, "cuda", 2), caps, "lamport") is None


def test_evidence_that_holds_at_any_world_size_says_why(monkeypatch, tmp_path):
    nccl = base.get("nccl")
    e = _records.entry("nccl", FEATURES, kind="one_gpu", world_sizes=(1,), any_world_size="NCCL runs between the kernels")
    caps = GroupCaps(**{**CAPS.__dict__, "dist_backend": "nccl"})
    with _records.installed(monkeypatch, tmp_path, ("nccl", e)):
        assert nccl.check(_problem(GROUP), caps, "default") is None
        assert "holds at any W" in verification.summary(verification.verdict("nccl", nccl.verified_sources("default"))
                                                         )["evidence"][0]


def test_a_missing_record_refuses_every_path_and_says_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(verification, "RECORD_PATH", tmp_path / "nowhere.json")
    with caplog.at_level("WARNING", logger="arfuse"):
        assert "never verified" in SYMM.check(_problem(), CAPS, "lamport")
        assert "never verified" in SYMM.check(_problem(), CAPS, "one_shot")
    assert sum("no verification record" in r.getMessage() for r in caplog.records) == 1


def test_the_record_ships_in_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["arfuse"]
    rel = verification.RECORD_PATH.relative_to(REPO / "arfuse")
    assert any(rel.match(pattern) for pattern in data), (rel, data)


def _fingerprint_with(monkeypatch, module: str, text: str) -> str:
    original = verification._source_path

    def patched(name):
        if name == module:
            path = Path(monkeypatch.tmp) / "patched.py"
            path.write_text(text)
            return path
        return original(name)

    verification.fingerprint.cache_clear()
    monkeypatch.setattr(verification, "_source_path", patched)
    try:
        return verification.fingerprint(SYMM.verified_sources("lamport"))[0]
    finally:
        monkeypatch.setattr(verification, "_source_path", original)
        verification.fingerprint.cache_clear()


def test_fingerprint_ignores_comments_and_docstrings_and_sees_code(monkeypatch, tmp_path):
    monkeypatch.tmp = tmp_path
    source = verification._source_path("arfuse.kernels._epilogue").read_text()
    now = verification.fingerprint(SYMM.verified_sources("lamport"))
    assert "arfuse/kernels/_epilogue.py" in now[1] and "arfuse/kernels/_sync.py" in now[1]
    commented = source.replace('"""The fused epilogue', '"""Reworded: the fused epilogue', 1) + "\n# a comment\n"
    assert _fingerprint_with(monkeypatch, "arfuse.kernels._epilogue", commented) == now[0]
    changed = source.replace("* 0.0", "* 1.0", 1)
    assert changed != source
    assert _fingerprint_with(monkeypatch, "arfuse.kernels._epilogue", changed) != now[0]


def test_fingerprint_covers_the_core_values_the_kernels_read(monkeypatch):
    from arfuse.core import spec

    verification.fingerprint.cache_clear()
    before = verification.fingerprint(SYMM.verified_sources("lamport"))[0]
    monkeypatch.setattr(spec, "CODE_FIELDS", spec.CODE_FIELDS[::-1])  # the bit layout the kernels decode
    verification.fingerprint.cache_clear()
    assert verification.fingerprint(SYMM.verified_sources("lamport"))[0] != before
    monkeypatch.undo()
    verification.fingerprint.cache_clear()


def test_adding_evidence_replaces_the_same_code_and_keeps_the_newest_history():
    record = {"paths": {}}
    old = dict(kind="virtual_ranks", sources="sha256:a", date="2026-12-01", features=[])
    older = dict(old, date="2026-11-01")
    verification.add(record, "p", older)
    verification.add(record, "p", old)
    assert record["paths"]["p"] == [old]  # same kind, same code: replaced
    new = dict(kind="virtual_ranks", sources="sha256:b", date="2026-12-07", features=[])
    real = dict(kind="real_ranks", sources="sha256:b", date="2026-12-08", features=[])
    verification.add(record, "p", new)
    verification.add(record, "p", real)
    assert record["paths"]["p"] == [new, old, real]


def test_the_shipped_record_is_well_formed():
    record = verification.load()
    assert record["format"] == 1
    for section in ("paths", "components"):
        for path, entries in record[section].items():
            for e in entries:
                assert e["kind"] in verification.KINDS and e["sources"].startswith("sha256:"), (path, e)
                assert re.fullmatch(r"\d{4}-\d\d-\d\d", e["date"]) and e["world_sizes"], (path, e)
                assert set(e["features"]) <= FEATURES and isinstance(e["ok"], bool), (path, e)
                assert len(e["commit"] or "") == 40 and e["results"], (path, e)


def test_the_sync_protocol_keeps_its_real_rank_evidence_while_unchanged():
    v = verification.component_verdict("triton_symm/sync")
    assert v.files == ("arfuse/kernels/_sync.py",)
    assert any(e["kind"] == "real_ranks" for e in v.evidence + v.stale), "the sync protocol's evidence is gone"


def test_the_readme_table_is_the_record_on_this_code():
    readme = (REPO / "README.md").read_text()
    table = verification.table()
    assert table in readme, "README's verification table is out of date: python bench/verify_kernels.py table"


CANONICAL_SNIPPET = '''
"""Doc."""
import triton


@triton.jit
def k(x, n: int = 4, *, flag=None):
    """Doc."""
    y = x + 1  # a comment
    return f"{y!r:>4}", u"k", b"z"


class C:
    a: int = 1
'''


def test_the_fingerprint_is_the_same_on_every_python():
    """The GPU machine runs Python 3.12, CI 3.11: ``ast.dump``'s text differs between them (3.12's
    ``type_params=[]``), the canonical form does not (checked on 3.10-3.13); this pins it."""
    import ast
    import hashlib

    text = verification._canonical(verification._strip_docstrings(ast.parse(CANONICAL_SNIPPET)))
    assert "type_params" not in text and "Doc." not in text and "comment" not in text
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "6dea8a3f560a5ceac9e09d845edee3090fdbb7c902810e0ec01f21e317cb2ca0"


def test_every_fingerprint_is_the_same_in_every_process():
    """A value the kernels read may be a set (``spec.FEATURES``), whose repr follows the string hash seed: the
    fingerprints must not, or evidence made in one process would look stale in the next."""
    import subprocess
    import sys

    code = ("from arfuse.backends import verification as v\n"
            "print(sorted((x.path, x.sources) for x in v.verdicts()))\n")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed), cwd=REPO).stdout for seed in ("1", "2", "3")}
    assert len(seen) == 1, seen
    assert verification._value_digest(frozenset({"b", "a"})) == "frozenset({'a', 'b'})"
    assert verification._value_digest(("a", 1, frozenset())) == repr(("a", 1, frozenset()))
    assert verification._value_digest((2,)) == "(2,)"



def _results(points, protocol_worlds=(2, 8), triton="3.6.0", device="gpu"):
    prints = {f"triton_symm/{v}": "sha256:x" for v in ("lamport", "lamport_two_shot", "one_shot", "two_shot")}
    return dict(environment=dict(date="2026-12-07", device=device, torch="2.11", triton=triton, commit="c"),
                fingerprints=prints, points=points,
                timeouts=[dict(variant="lamport", world=w, check="timeout", ok=True) for w in protocol_worlds],
                graphs=[dict(variant="lamport", world=w, check="graph", ok=True) for w in protocol_worlds])


def _point(world, spec, features, ok=True, dtype="bfloat16"):
    return dict(variant="lamport", world=world, spec=spec, features=features, ok=ok, mode="plain", dtype=dtype,
                hidden=7168, problem=None if ok else "differs")


def test_a_run_cut_short_vouches_at_each_world_size_and_dtype_for_what_ran_there():
    from arfuse.testing import verification_run as vrun

    points = [_point(2, "allreduce", []), _point(2, "fp8g", ["fp8_group", "residual"]), _point(8, "allreduce", []),
              _point(8, "res", ["residual"]), _point(8, "res", ["residual"], dtype="float32")]
    entry = vrun.evidence([_results(points)], "here")["triton_symm/lamport"]
    assert entry["ok"] and entry["recordable"] and entry["world_sizes"] == [2, 8] and entry["gaps"] == []
    assert entry["features"] == ["fp8_group", "residual"]
    assert entry["features_by_world"] == {"2": {"bfloat16": ["fp8_group", "residual"]},
                                          "8": {"bfloat16": ["residual"], "float32": ["residual"]}}
    v = verification.Verdict("p", "s", (), [dict(entry, sources="s")])
    assert v.reason(["residual"], "res", 8, torch.float32) is None
    assert "fp8_group not yet verified on GPUs at world size 8" in v.reason(["fp8_group"], "x", 8, torch.bfloat16)
    assert "residual not yet verified on GPUs at world size 2" in v.reason(["residual"], "res", 2, torch.float32)


def test_a_part_of_a_run_without_its_protocol_checks_is_a_gap_not_a_failure():
    from arfuse.testing import verification_run as vrun

    points = [_point(2, "res", ["residual"]), _point(4, "res", ["residual"])]
    alone = vrun.evidence([_results(points, protocol_worlds=())], "here")["triton_symm/lamport"]
    assert not alone["recordable"] and alone["cases"] == 0
    assert alone["gaps"] == ["1 points at 2 ranks left out: no timeout or graph check there",
                             "1 points at 4 ranks left out: no timeout or graph check there"]
    part = vrun.evidence([_results(points, protocol_worlds=(2,))], "here")["triton_symm/lamport"]
    assert part["ok"] and part["recordable"] and part["world_sizes"] == [2] and len(part["gaps"]) == 1
    failed = _results(points, protocol_worlds=(2, 4))
    failed["graphs"][1] = dict(variant="lamport", world=4, check="graph", ok=False, problem="replay 3 differs")
    entry = vrun.evidence([failed], "here")["triton_symm/lamport"]
    assert entry["recordable"] and not entry["ok"] and "graph check at 4 ranks failed" in entry["problems"][0]


def test_parts_of_a_run_on_different_releases_are_not_merged():
    from arfuse.testing import verification_run as vrun

    points = [_point(2, "res", ["residual"])]
    both = vrun.evidence([_results(points), _results(points, triton="3.6.1", device="other gpu")], "here")
    assert both["triton_symm/lamport"]["device"] == "gpu, other gpu"
    with pytest.raises(ValueError, match="different triton releases"):
        vrun.evidence([_results(points), _results(points, triton="3.9.0")], "here")


def test_evidence_covers_only_the_triton_release_it_ran_with(monkeypatch, tmp_path):
    e = dict(_records.entry("triton_symm/lamport", FEATURES), triton="3.6.0")
    with _records.installed(monkeypatch, tmp_path, ("triton_symm/lamport", e)):
        for here in ("3.6.0", "3.6.1+git0a1b"):
            monkeypatch.setattr(verification, "triton_version", lambda: here)
            assert SYMM.check(_problem(), CAPS, "lamport") is None
        monkeypatch.setattr(verification, "triton_version", lambda: "3.9.0")
        why = SYMM.check(_problem(), CAPS, "lamport")
        assert "verified with Triton 3.6.0, not with this Triton 3.9.0" in why and base.ALLOW_UNVERIFIED_ENV in why


def test_the_triton_filter_comes_first_and_each_release_keeps_its_evidence(monkeypatch, tmp_path):
    old = dict(_records.entry("triton_symm/lamport", FEATURES, world_sizes=(2,)), triton="3.6.0")
    new = dict(_records.entry("triton_symm/lamport", FEATURES, world_sizes=(4,)), triton="3.9.0")
    record = {"paths": {}}
    verification.add(record, "triton_symm/lamport", old)
    verification.add(record, "triton_symm/lamport", new)
    assert record["paths"]["triton_symm/lamport"] == [old, new]  # a run on another Triton replaces nothing
    v = verification.Verdict("triton_symm/lamport", old["sources"], (), [old, new])
    why = v.reason(["residual"], "residual_rmsnorm", 2, torch.bfloat16, "3.9.0")
    assert "not yet verified at world size 2 in bfloat16 with Triton 3.9.0 (verified: world sizes [4]" in why
    assert v.reason(["residual"], "residual_rmsnorm", 2, torch.bfloat16, "3.6.2") is None
    assert "not with this Triton unknown" in v.reason(["residual"], None, 2, torch.bfloat16, "unknown")


def test_an_unreadable_triton_version_matches_only_itself(monkeypatch):
    assert verification.same_release("3.6.0", "3.6.1+git") and not verification.same_release("3.6.0", "3.9.0")
    assert not verification.same_release("unknown", "3.6.0") and verification.same_release("dev", "dev")
    from arfuse.core import requirements

    verification.triton_version.cache_clear()
    monkeypatch.setattr(requirements, "installed_version",
                        lambda name: "3.7.0+rocm" if name == "pytorch-triton-rocm" else None)
    try:
        assert verification.triton_version() == "3.7.0+rocm"
    finally:
        verification.triton_version.cache_clear()


def test_entries_with_one_feature_list_per_world_size_are_read_too():
    e = dict(_records.entry("triton_symm/lamport", FEATURES, world_sizes=(2, 4)),
             features_by_world={"2": sorted(FEATURES)})
    v = verification.Verdict("p", e["sources"], (), [e])
    assert v.reason(["residual"], None, 2, torch.bfloat16) is None
    assert "residual not yet verified on GPUs at world size 4" in v.reason(["residual"], None, 4, torch.bfloat16)


def test_the_summary_says_when_the_evidence_is_for_another_triton(monkeypatch, tmp_path):
    e = dict(_records.entry("triton_symm/lamport", CLASSIC_FEATURES), triton="3.6.0")
    v = verification.Verdict("triton_symm/lamport", e["sources"], (), [e])
    assert verification.summary(v)["verified"].startswith("fp8_static, norm")  # the README's table: whatever Triton is here
    assert verification.summary(v, "3.6.1")["verified"].startswith("fp8_static, norm")
    assert verification.summary(v, "3.9.0")["verified"].startswith("nothing with this Triton 3.9.0 (verified with")
