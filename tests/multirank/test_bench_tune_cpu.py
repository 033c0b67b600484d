"""``arfuse bench`` and the tuner end to end on gloo with 2 ranks: valid JSON, a PNG, a table file that merges
into an existing one; with fake backends of known speed, the tuner picks the fast ones, a wrong backend is
reported FAILED (not timed, not tabled), and ``auto`` then runs exactly what the table says. ``arfuse tune
--from-bench`` turns a bench JSON into table entries.

Two launches, kept small (hidden 256, three token counts, few repeats): the ``arfuse bench`` command, and the
tuner plus the sweep with fakes (the command line cannot register fakes in the ranks it spawns).
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from arfuse.backends.base import Support, register, unregister
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.bench import report, runner, timing, tuner
from arfuse.bench.plot import plot
from arfuse.cli.main import main as cli_main
from arfuse.launch import run_ranks
from arfuse.select import table

HIDDEN = 256
TOKENS = (1, 4, 8)
QUICK = ["--hidden", str(HIDDEN), "--dtype", "float32", "--world-sizes", "2", "--device", "cpu",
         "--cpu-repeats", "3", "--warmup", "1", "--no-progress", "--tokens", ",".join(map(str, TOKENS))]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Speeds(TorchRefBackend):
    """Fake paths of known speed: the reference math plus a sleep; ``wrong`` is fast and off by one."""

    name = "fake_speed"
    variants = ("capped", "fast", "slow", "wrong")
    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
    priority = 50
    SLEEP_S = {"capped": 0.0, "fast": 0.02, "slow": 0.06, "wrong": 0.0}  # far apart: CPU timing is noisy

    def check_variant(self, problem, caps, variant):
        return "capped runs at most 4 tokens" if variant == "capped" and problem.num_tokens > 4 else None

    def run(self, ws, variant, spec, call):
        time.sleep(self.SLEEP_S[variant])
        super().run(ws, variant, spec, call)
        if variant == "wrong":
            call.out.add_(1.0)


def _tune_then_bench(rank, world, out_path):
    register(Speeds())
    try:
        quick = timing.TimingConfig(calls_per_graph=1, warmup=1, cpu_repeats=3)
        cfg = runner.SweepConfig(tokens=TOKENS, hidden=(HIDDEN,), dtypes=("float32",), only=("fake_speed",),
                                 peers=False, auto=False, timing=quick, progress=False)
        path, entries, tuned = tuner.tune_rank(rank, world, cfg, "cpu", out_path)
        bench_cfg = runner.SweepConfig(tokens=TOKENS, hidden=(HIDDEN,), dtypes=("float32",),
                                       only=("fake_speed/fast", "auto", "peers"), timing=quick, table_path=out_path,
                                       progress=False)
        return path, entries, tuned, runner.sweep(bench_cfg, None, "cpu")
    finally:
        unregister(Speeds.name)


KEEP = {"gpu": "NVIDIA H200", "world_size": 4, "dtype": "bfloat16", "hidden_size": 8192,
        "ranges": [{"max_tokens": None, "backend": "nccl"}]}
STALE = {"gpu": "cpu", "world_size": 2, "dtype": "float32", "hidden_size": HIDDEN,
         "ranges": [{"max_tokens": None, "backend": "gone"}]}


@pytest.fixture(scope="module")
def with_fakes(tmp_path_factory):
    """Tune the fakes into a table file that already holds another machine's entry and a stale one of this
    shape, then bench them with ``auto`` reading that file."""
    out = tmp_path_factory.mktemp("fakes") / "tune.json"
    out.write_text(json.dumps({"format": table.FORMAT, "version": 1, "entries": [KEEP, STALE]}))
    return out, run_ranks(_tune_then_bench, 2, str(out), device="cpu", timeout_s=240)


def _by(ms, path):
    return {m["tokens"]: m for m in ms if m["path"] == path}


def test_cli_bench_writes_json_png_and_tables(tmp_path, capsys):
    j, png = tmp_path / "r" / "bench.json", tmp_path / "r" / "bench.png"
    rc = cli_main(["bench", *QUICK, "--json", str(j), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "µs per call - TP2, hidden 256, float32" in out and "speed-up" in out and "cpu-eager" in out
    doc = json.loads(j.read_text())
    ms = report.validate(doc)
    for key in ("host", "torch", "triton", "flashinfer", "cuda", "nccl", "date", "gpus"):
        assert key in doc["machine"], key
    assert doc["config"]["world_sizes"] == [2] and "cpu-eager" in doc["config"]["timing_method"]
    for path, kind in (("torch_ref", "backend"), ("auto", "auto"), ("gloo+norm", "peer")):
        got = _by(ms, path)
        assert sorted(got) == list(TOKENS), path
        for n, m in got.items():
            assert m["kind"] == kind and m["status"] == "ok" and m["us"] > 0 and len(m["us_ranks"]) == 2, m
            assert m["err_out"] <= 1e-5 and m["err_residual"] <= 1e-5 and m["identical"], m
            if kind != "peer":
                # the check, one warm-up call, 3 samples of 10 calls
                assert m["ran"] == ["torch_ref"] and m["counters"]["calls"] == {"torch_ref": 1 + 1 + 3 * 10}, m
    cuda_only = [m for m in ms if m["status"] == "n/a"]
    assert cuda_only and all("cuda" in m["reason"] for m in cuda_only)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_tuned_entry_replaces_only_the_matching_one(with_fakes):
    out, _ = with_fakes
    loaded = table.load(out)
    assert len(loaded.entries) == 2
    assert loaded.match("NVIDIA H200", 4, torch.bfloat16, 8192).ranges[0].backend == "nccl"
    assert loaded.match("cpu", 2, torch.float32, HIDDEN).ranges[0].choices[0] == ("fake_speed", "capped")


def test_cli_tune_from_bench_json(tmp_path, capsys, with_fakes):
    _, results = with_fakes
    doc = report.document(report.machine_info(), {"timing_method": "cpu"}, [results[0][3]])
    src, out = tmp_path / "bench.json", tmp_path / "defaults.json"
    src.write_text(json.dumps(doc))
    assert cli_main(["tune", "--from-bench", str(src), "--out", str(out)]) == 0
    entry = table.load(out).match("cpu", 2, torch.float32, HIDDEN)
    assert entry.ranges[0].choices[0] == ("fake_speed", "fast") and entry.source.startswith("bench.json")
    assert cli_main(["tune", "--write-defaults"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli_main(["tune", "--from-bench", str(bad), "--out", str(out)]) == 2
    assert "not an arfuse bench document" in capsys.readouterr().err


def test_tuner_picks_the_fastest_capable_path_and_skips_a_wrong_one(with_fakes):
    out, results = with_fakes
    paths = {r[0] for r in results}
    assert paths == {str(out)}
    assert results[0][1] == results[1][1]  # every rank built the same entries
    (entry,) = results[0][1]
    assert entry["gpu"] == "cpu" and entry["world_size"] == 2 and entry["hidden_size"] == HIDDEN
    assert [(r["max_tokens"], r["variant"]) for r in entry["ranges"]] == [(4, "capped"), (None, "fast")]
    assert entry["ranges"][0]["alternatives"] == ["fake_speed/fast", "fake_speed/slow"]
    assert entry["ranges"][1]["alternatives"] == ["fake_speed/slow"]
    tuned = results[0][2]["measurements"]
    for n, m in _by(tuned, "fake_speed/wrong").items():
        assert m["status"] == "FAILED" and m["us"] is None and "float64 reference" in m["reason"], m
    assert set(_by(tuned, "fake_speed/capped")) == set(TOKENS)
    assert _by(tuned, "fake_speed/capped")[8]["status"] == "n/a"
    slow, fast = _by(tuned, "fake_speed/slow"), _by(tuned, "fake_speed/fast")
    assert all(slow[n]["us"] > fast[n]["us"] for n in TOKENS)


def test_auto_runs_what_the_tuned_table_says(with_fakes, tmp_path):
    _, results = with_fakes
    bench = results[0][3]
    assert bench == results[1][3]  # every rank returns the same records
    auto = _by(bench["measurements"], "auto")
    for n, m in auto.items():
        expected = "fake_speed/capped" if n <= 4 else "fake_speed/fast"
        assert m["status"] == "ok" and m["ran"] == [expected] and m["plan"]["path"] == expected, m
        assert m["plan"]["reason"].startswith("tuned choice 1")
    peers = {m["path"] for m in bench["measurements"] if m["kind"] == "peer"}
    assert peers == {"gloo+norm"}
    doc = report.document(report.machine_info(), {"timing_method": "cpu"}, [bench])
    png = plot(doc, tmp_path / "fakes.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
