"""``arfuse bench --host`` end to end on the CPU, kept short (3 calls per sample, 2 samples): world size 1 and 2
gloo ranks, every case timed (arfuse, the bare backend work where there is one, the unfused torch), the profile
parts, the stubbed launch paths of every GPU backend, valid JSON and the tables. Speed is not checked here: it is
the benchmark's output, not a test's."""
from __future__ import annotations

import importlib.util
import json

from arfuse.bench import host_cases, host_profile, host_report
from arfuse.cli.main import main as cli_main

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_host_bench_runs_every_case_at_world_sizes_1_and_2_and_writes_valid_json(tmp_path, capsys):
    path = tmp_path / "host.json"
    rc = cli_main(["bench", "--host", "--device", "cpu", "--world-sizes", "1,2", "--calls", "3", "--samples", "2",
                   "--warmup", "0", "--profile", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(path.read_text())
    host_report.validate(doc)
    assert doc["device"] == "cpu" and [r["world_size"] for r in doc["runs"]] == [1, 2]
    names = {c.name for c in host_cases.cases(host_cases.HostConfig(**doc["config"]))}
    for run in doc["runs"]:
        rows = [r for r in run["rows"] if r.get("case")]
        assert {r["case"] for r in rows} == names
        for row in rows:
            t = row["timing"]
            assert t["arfuse"]["us"] > 0 and t["unfused"]["us"] > 0 and row["path"] == "torch_ref"
            assert t["anchor"]["min_us"] > 0 and row["anchor_target"] in (1.5, 2.0)  # F.rms_norm, same rounds
            if row["form"] == "object" and "out=" not in row["case"]:
                assert "bare" in t and "over_bare_us" in t["arfuse"]
            assert sum(row["profile_scaled_us"].values()) > 0
            assert set(row["profile_us"]) <= set(host_profile.PARTS)
    if HAS_TRITON:
        stubbed = doc["stubbed_launchers"]
        assert {(r["backend"], r["variant"]) for r in stubbed} == {
            ("nccl", "default"), ("flashinfer", "auto"),
            *(("triton_symm", v) for v in ("lamport", "one_shot", "two_shot", "lamport_two_shot"))}
        assert not [r for r in stubbed if "error" in r]
    assert "arfuse host cost per eager call, world size 2" in out and "where the µs go" in out
    assert "vs F.rms_norm / target" in out
