"""What the commands print: tables that fit 80 columns without cutting names apart, CPU timings called
indicative with no winner inside the spread, and ``arfuse doctor`` rows that say yes/no with a reason."""
from __future__ import annotations

import argparse
import re

import pytest

from arfuse.bench import report, timing
from arfuse.cli import demo, doctor
from tests.unit import fake_flashinfer as ff

WIDTH = 80


@pytest.fixture
def columns_80(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))


def _lines(text):
    return [line.rstrip() for line in text.splitlines()]


def test_demo_table_keeps_pattern_names_whole_at_80_columns(columns_80, capsys):
    config = demo.DemoConfig(device="cpu", tokens=(1, 257), hidden=1024, dtype="bfloat16", backend="auto", iters=20)
    rows = [demo.Row(n, p, "triton_symm/lamport_two_shot" if n == 257 else "torch_ref", 2.2e-3,
                     None if p in ("rmsnorm", "all_reduce") else 2.3e-3, 12345.6, None)
            for n in config.tokens for p in demo.PATTERNS]
    rows[-1] = demo.Row(257, list(demo.PATTERNS)[-1], "torch_ref", 1.0, None, 5.0, "output error > 0.01")
    assert demo._report(config, 2, rows, {"calls": {}}, True) == 1
    lines = _lines(capsys.readouterr().out)
    assert max(map(len, lines)) <= WIDTH, "\n".join(lines)
    table = "\n".join(lines)
    for pattern in demo.PATTERNS:  # each name whole, on one line, as often as it has rows
        assert len(re.findall(rf"\b{pattern}\b(?!_)", table)) == 2, (pattern, table)
    assert "…" not in table


def _m(path, kind, n, us, spread=None, status="ok"):
    return {"world_size": 2, "hidden": 1024, "dtype": "bfloat16", "tokens": n, "path": path, "kind": kind,
            "status": status, "us": us, "us_spread": spread, "reason": None if status == "ok" else "why",
            "identical": True}


def _cpu_doc():
    ms = []
    for n in (1, 128):
        ms += [_m("torch_ref", "backend", n, 100.0, [90.0, 120.0]), _m("auto", "auto", n, 110.0, [95.0, 125.0]),
               _m("gloo+norm", "peer", n, 300.0, [280.0, 320.0])]
    machine = {"host": "h", "torch": "2.13", "cuda": None, "nccl": None, "triton": None, "flashinfer": None,
               "date": "today", "gpus": []}
    config = {"timing_method": timing.TimingConfig().method("cpu"), "device": "cpu"}
    return {"format": report.FORMAT, "version": report.VERSION, "machine": machine, "config": config,
            "shapes": [], "measurements": ms}


def test_bench_report_headings_stay_one_line_and_speedups_are_ratios_only(columns_80, capsys):
    from arfuse.cli import output

    report.print_report(_cpu_doc(), output.console(220))
    lines = _lines(capsys.readouterr().out)
    assert max(map(len, lines)) <= WIDTH
    assert "µs per call - TP2, hidden 1024, bfloat16" in lines
    assert "speed-up (×) vs gloo+norm / vs best peer - TP2, hidden 1024, bfloat16" in lines
    assert any("indicative only" in line for line in lines)
    start = lines.index("speed-up (×) vs gloo+norm / vs best peer - TP2, hidden 1024, bfloat16")
    body = [line for line in lines[start:] if line.strip().startswith("│")]
    assert body and all(line.split("│")[-2].strip() == "gloo+norm" for line in body), body  # no µs there
    for line in body:
        cells = [c.strip() for c in line.split("│")[2:-2]]
        assert all(re.fullmatch(r"≈?\d+\.\d\d / ≈?\d+\.\d\d", c) for c in cells), cells


def test_no_winner_is_called_within_the_spread():
    fast, close, far = (_m("a", "backend", 1, 100.0, [90.0, 120.0]), _m("b", "backend", 1, 110.0, [95.0, 125.0]),
                        _m("c", "backend", 1, 300.0, [280.0, 320.0]))
    assert report.within_spread(fast, close) and not report.within_spread(fast, far)
    assert report._cell(close, fast).startswith("[bold green]")  # a tie with the fastest is shown as one
    assert not report._cell(far, fast).startswith("[bold green]")
    assert report._ratio(close, fast).startswith("[yellow]≈")  # a ratio inside the spread is no speed-up
    assert report._ratio(far, fast) == "[green]3.00[/]"
    gpu_a, gpu_b = _m("a", "backend", 1, 5.0), _m("b", "backend", 1, 5.1)  # CUDA: no spread taken
    assert not report.within_spread(gpu_a, gpu_b) and report._ratio(gpu_b, gpu_a) == "[green]1.02[/]"


def test_cpu_timing_takes_the_median_of_15_samples_with_their_quartiles():
    cfg = timing.TimingConfig()
    assert cfg.cpu_repeats == 15 and "indicative only" in cfg.method("cpu")
    assert timing.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert timing.quartiles([7.0]) == (7.0, 7.0)
    calls = []
    measured = timing.time_cpu_eager(lambda: calls.append(1), None, timing.TimingConfig(cpu_repeats=5))
    lo, hi = measured.spread
    assert lo <= measured.us <= hi and len(calls) == 3 + 5 * 10


def test_doctor_reports_the_installed_flashinfer_version_when_its_import_fails(tmp_path):
    directory = ff.write_dist_info(ff.write_broken(tmp_path, "import"), "0.7.4")
    with ff.loaded(directory) as probe:
        assert not probe.available and probe.version == "0.7.4"
        assert "import flashinfer failed: RuntimeError" in probe.reason
        rows = dict(doctor.flashinfer_rows(dict(probe.as_dict(), installed=probe.available,
                                                probe_reason=probe.reason)))
    assert rows["installed"] == "yes, version 0.7.4"
    assert rows["usable"].startswith("no: import flashinfer failed: RuntimeError")


def test_doctor_says_not_installed_plainly(tmp_path):
    with ff.loaded(tmp_path) as probe:  # nothing named flashinfer on the path
        rows = dict(doctor.flashinfer_rows(dict(probe.as_dict(), installed=False, probe_reason=probe.reason)))
    if probe.version is None:
        assert rows == {"installed": "no (pip install flashinfer-python)", "usable": "no"}


def test_doctor_device_rows_are_words_with_reasons():
    report_ = doctor.collect(argparse.Namespace(tokens=1, hidden=8192, dtype="bfloat16"))
    rows = doctor.device_rows(report_["device"])
    for key, value in rows:
        assert value not in ("None", "False", "True") and "None" not in value, (key, value)
        if value == "no" or value.startswith("no "):
            assert value.startswith("no ("), (key, value)
        if value.startswith("no:"):
            assert len(value) > len("no: "), (key, value)
    triton = dict(rows)["triton"]
    assert "version" in triton or "not installed" in triton
