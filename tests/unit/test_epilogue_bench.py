"""``arfuse bench --epilogue`` without a GPU: the bytes each kind must move, the launch sweeps' spaces, the choice per
token range and the table entries it makes, the target check and the tables from a synthetic document, the whole
run with the GPU work stubbed, ``arfuse tune --from-bench`` on such a document, and the CLI's refusal without
CUDA."""
import io
import json

import pytest
import torch

from arfuse.bench import epilogue as E, epilogue_report as R, launch_ranges
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout
from arfuse.kernels import launch_config as lc, launch_table as lt, nccl_launch as nl


def test_bytes_moved_counts_every_stream_once():
    t, h = 1024, 4096
    assert E.bytes_moved(FusionSpec(), t, h, 2) == 4 * t * h * 2 + h * 2  # sum, residual in; residual_out, norm out
    assert E.bytes_moved(FusionSpec(residual=False), t, h, 2) == 2 * t * h * 2 + h * 2
    fp8 = E.bytes_moved(FusionSpec(quant=Quant.FP8_STATIC), t, h, 2)
    assert fp8 == 3 * t * h * 2 + t * h + h * 2
    group = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=128, scale_layout=ScaleLayout.UE8M0, also_norm=True)
    assert E.bytes_moved(group, t, h, 2) == fp8 + t * h * 2 + t * (32 // 4) * 4
    moe = FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True)
    assert E.bytes_moved(moe, t, h, 2, top_k=8) == t * h * 2 * 10 + t * 8 * 8


@pytest.mark.parametrize("hidden", [4096, 5120, 7168, 8192, 256])
def test_launch_space_holds_the_default_and_sane_tiles(hidden):
    space = E.launch_space(hidden, sms=132)
    assert space[0] == nl.default_epilogue_launch(hidden) and len(set(space)) == len(space)
    for launch in space[1:]:
        assert 8 <= launch.rows * launch.block_h // (32 * launch.num_warps) <= 64
        assert launch.max_ctas in (4 * 132, 0)
    assert {launch.evict_first for launch in space} == ({False, True} if hidden >= 1024 else {False})
    for launch in space:  # every launch is one a table can hold
        lt.make_entry("epilogue", hidden, [(None, launch_ranges.fields("epilogue", E._launch_list(launch)))])


@pytest.mark.parametrize("hidden", [4096, 5120, 7168, 8192, 256])
def test_moe_space_holds_the_default_todays_load_order_and_splits(hidden):
    space = E.moe_space(hidden)
    default = nl.default_moe_launch(hidden)
    assert space[:2] == [default, default._replace(slots=1)] and len(set(space)) == len(space)
    for launch in space[2:]:
        assert launch.block_h < default.block_h and launch.block_h // (32 * launch.num_warps) == 8
    assert (len(space) > 2) == (hidden > 512)
    for launch in space:
        lt.make_entry("moe_finalize", hidden, [(None, launch_ranges.fields("moe_finalize", list(launch)))])


def _m(hidden, kind, tokens, launch, us, path="arfuse", kernel="epilogue"):
    return {"hidden": hidden, "kind": kind, "tokens": tokens, "launch": list(launch), "us": us, "path": path,
            "pct_hbm": 90.0, "kernel": kernel}


def test_choose_takes_the_least_worst_ratio_over_kinds_per_token_count():
    a, b, c = (1, 16, 528, False), (2, 8, 0, False), (4, 8, 0, True)
    sweep = [_m(8192, "k", 1, a, 3.0), _m(8192, "k", 1, b, 3.3), _m(8192, "k", 1, c, 2.0),
             _m(8192, "j", 1, a, 3.0), _m(8192, "j", 1, b, 3.1), _m(8192, "j", 1, c, 6.0),  # c: 2.0x worse for j
             _m(8192, "k", 64, a, 5.0), _m(8192, "k", 64, b, 5.02), _m(8192, "j", 64, a, 5.0), _m(8192, "j", 64, b, 4.0),
             _m(8192, "k", 4096, a, 100.0), _m(8192, "k", 4096, b, 90.0), _m(8192, "j", 4096, a, 100.0),
             _m(8192, "j", 4096, b, 90.0), _m(8192, "k", 4096, c, 50.0)]  # c lacks a kind at 4096: never chosen
    assert launch_ranges.choose(sweep, "epilogue") == {8192: [(1, a), (None, b)]}
    sweep += [_m(8192, "k", 16384, a, 100.0), _m(8192, "k", 16384, b, 100.5)]  # b within 1%: kept
    sweep += [_m(8192, "j", 16384, a, 100.0), _m(8192, "j", 16384, b, 100.5)]
    assert launch_ranges.choose(sweep, "epilogue")[8192] == [(1, a), (None, b)]
    sweep += [_m(8192, "k", 32768, a, 100.0), _m(8192, "k", 32768, b, 102.0), _m(8192, "j", 32768, a, 100.0),
              _m(8192, "j", 32768, b, 102.0)]  # 2% worse: a takes over again
    assert launch_ranges.choose(sweep, "epilogue")[8192] == [(1, a), (16384, b), (None, a)]
    assert launch_ranges.choose(sweep, "moe_finalize") == {}


def test_ties_go_to_the_launch_swept_first():
    a, b = (1, 4, 528, False), (1, 4, 0, False)
    sweep = [_m(4096, "k", t, launch, 2.0) for t in (1, 2) for launch in (a, b)]
    assert launch_ranges.choose(sweep, "epilogue") == {4096: [(None, a)]}


def _doc(ranges=None):
    ms = []
    for tokens, ours, compiled, pct in ((1, 3.0, 4.0, 1.0), (2048, 20.0, 25.0, 88.0), (16384, 300.0, 290.0, 80.0)):
        ms.append(dict(_m(5120, "residual_rmsnorm", tokens, (1, 16, 528, False), ours, "arfuse/default"), pct_hbm=pct))
        ms.append(dict(_m(5120, "residual_rmsnorm", tokens, (2, 8, 0, True), ours * 0.9, "arfuse/tuned"),
                       pct_hbm=pct / 0.9))
        ms.append(dict(_m(5120, "residual_rmsnorm", tokens, (), compiled, "torch.compile"), launch=None))
    sweep = [_m(5120, "moe_prologue", 1, (8192, 16, 528, 4), 4.0, kernel="moe_finalize"),
             _m(5120, "moe_prologue", 1, (1024, 4, 0, 8), 2.5, kernel="moe_finalize")]
    ranges = ranges or {"epilogue": {"5120": [[1, [1, 16, 528, False]], [None, [2, 8, 0, True]]]},
                        "moe_finalize": {"5120": [[None, [1024, 4, 0, 8]]]}}
    return {"format": E.FORMAT, "version": 2, "gpu": "NVIDIA H200", "hbm_gbps": 4000.0, "measurements": ms,
            "failed": [], "sweep": sweep, "ranges": ranges,
            "machine": {"date": "2026-12-03", "git_commit": "abc", "gpus": ["NVIDIA H200"]},
            "config": {"hidden": [5120], "tokens": [1, 2048, 16384], "dtype": "bfloat16",
                       "kinds": {"residual_rmsnorm": "residual_rmsnorm"}, "timing": "cuda-graph"}}


def test_summary_checks_both_targets_per_path():
    default, = [r for r in R.summary(_doc(), "arfuse/default")]
    assert default["min_pct_hbm"] == 80.0 and default["at_tokens"] == 16384
    assert default["min_speedup"] == pytest.approx(290 / 300) and not default["meets_targets"]
    tuned, = R.summary(_doc(), "arfuse/tuned")
    assert tuned["min_pct_hbm"] == pytest.approx(80 / 0.9) and not tuned["meets_targets"]  # 88.9% < 90%
    assert tuned["min_speedup"] == pytest.approx(290 / 270)


def test_report_prints_tables_ranges_and_the_moe_launches():
    from rich.console import Console

    buf = io.StringIO()
    R.print_report(_doc(), Console(file=buf, width=250))
    text = buf.getvalue()
    assert "hidden 5120" in text and "1.39x" in text  # the tuned launch: 25 / 18 µs
    assert "tuned epilogue launches, hidden 5120" in text and "1-1: (1, 16, 528, False); 2+: (2, 8, 0, True)" in text
    assert "MoE finalize launches, hidden 5120" in text and "(1024, 4, 0, 8)" in text


def test_table_entries_from_a_document_name_its_gpu_and_dtype_or_none():
    found = launch_ranges.entries(_doc())
    assert [(e.kernel, e.gpu, e.dtype, e.hidden_size) for e in found] == [
        ("epilogue", "NVIDIA H200", "bfloat16", 5120), ("moe_finalize", "NVIDIA H200", "bfloat16", 5120)]
    assert found[0].launches() == ((1, dict(rows=1, num_warps=16, max_ctas=528, evict_first=False)),
                                   (None, dict(rows=2, num_warps=8, max_ctas=0, evict_first=True)))
    assert all(e.gpu is None and e.dtype is None for e in launch_ranges.entries(_doc(), anywhere=True))
    old = dict(_doc(), recommended={"4096": {"launch": [1, 4, 528], "worst_ratio": 1.09}})
    del old["ranges"]  # the first format: one launch per hidden size
    assert [e.launches() for e in launch_ranges.entries(old)] == [((None, dict(rows=1, num_warps=4, max_ctas=528)),)]
    with pytest.raises(lt.LaunchTableError, match="'rows' must be a power of two"):
        launch_ranges.entries(_doc({"epilogue": {"5120": [[None, [3, 8, 0, False]]]}}))


def test_tune_from_bench_writes_launch_entries(tmp_path, capsys):
    from arfuse.cli.main import main

    doc, out = tmp_path / "epilogue.json", tmp_path / "launch.json"
    doc.write_text(json.dumps(_doc()))
    assert main(["tune", "--from-bench", str(doc), "--launch-out", str(out)]) in (0, None)
    table = lt.load(out)
    assert [(e.kernel, e.gpu, e.hidden_size) for e in table.entries] == [("epilogue", "NVIDIA H200", 5120),
                                                                         ("moe_finalize", "NVIDIA H200", 5120)]
    assert table.entries[0].source.startswith("epilogue.json: arfuse bench --epilogue")
    assert "moe_finalize NVIDIA H200 bfloat16 hidden 5120: 1+: block_h 1024" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cli_flag_needs_a_gpu(capsys):
    from arfuse.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--epilogue", "--hidden", "256"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "--epilogue" in err and "needs a CUDA device" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, words", [
    (["bench", "--kinds", "moe_prologue"], "--kinds applies to --epilogue"),
    (["bench", "--epilogue", "--kinds", "moe_prologue,mxfp8"], "--kinds: unknown mxfp8"),  # checked before the GPU
])
def test_kinds_flag_errors_are_one_line(argv, words, capsys):
    from arfuse.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and words in err and len(err.splitlines()) == 1, err


def test_a_kinds_subset_sweeps_only_the_listed_sweep_kinds(monkeypatch):
    import arfuse.bench.epilogue as E

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("arfuse.bench.report.machine_info", lambda: {})
    monkeypatch.setattr(E, "run", lambda cfg, device, **kw: seen.setdefault("cfg", cfg) and {"failed": ["stop"]})
    monkeypatch.setattr("arfuse.bench.epilogue_report.print_report", lambda doc: None)
    assert E.command((4096,), None, "bfloat16", None, 1, 1, progress=False, kinds=("moe_prologue",)) == 1
    assert seen["cfg"].kinds == ("moe_prologue",) and seen["cfg"].sweep_kinds == ()
    seen.clear()
    E.command((4096,), None, "bfloat16", None, 1, 1, progress=False, kinds=None)
    assert seen["cfg"].kinds == tuple(E.KINDS) and seen["cfg"].sweep_kinds == E.SWEEP_KINDS


def test_the_command_writes_the_results_and_the_launch_table(monkeypatch, tmp_path, capsys):
    doc = dict(_doc(), launch_table={"format": lt.FORMAT, "version": 1, "entries": []})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(E, "run", lambda cfg, device, on_update, **kw: on_update(doc) or doc)
    results, table = tmp_path / "r" / "epilogue.json", tmp_path / "t" / "launch.json"
    assert E.command((5120,), None, "bfloat16", str(results), 1, 1, progress=False, table_path=str(table)) == 0
    assert json.loads(results.read_text())["ranges"] == doc["ranges"]
    assert json.loads(table.read_text()) == doc["launch_table"]
    assert "tuned epilogue launches, hidden 5120" in capsys.readouterr().out


def test_the_run_sweeps_checks_chooses_and_compares_with_the_gpu_stubbed(monkeypatch):
    # run() end to end on CPU tensors, with the GPU's parts (copies, device facts, checks, timing) stubbed: every
    # launch is checked before it is timed, a failing one is recorded and never chosen, each token range gets the
    # launch the fake timings favour, and every kind is timed with the current, the tuned and the compiled path
    from types import SimpleNamespace

    from arfuse.backends.base import IndexGuard

    hidden, default = 1024, nl.default_epilogue_launch(1024)
    best_large, broken = nl.EpilogueLaunch(1024, 2, 8, 0, True), nl.EpilogueLaunch(1024, 1, 4, 0, True)
    split = nl.MoeLaunch(512, 2, 0, 8)

    def fake_us(launch, tokens):
        if isinstance(launch, nl.MoeLaunch):
            factor = (0.5 if tokens <= 16 else 1.5) if launch == split else 1.0 if launch == nl.default_moe_launch(
                hidden) else 1.2
        elif launch == default:
            factor = 1.0 if tokens < 2048 else 1.2
        else:
            factor = (1.1 if tokens < 2048 else 0.9) if launch == best_large else 1.3
        return (2.0 + tokens / 100) * factor

    checked = []

    def check(spec, hidden, dtype, launch, guard, device, top_k):
        checked.append(launch)
        return {"out": (1.0 if launch == broken else 1e-3, 1e-2)}

    updates = []
    monkeypatch.setattr(E, "measure_copies_gbps", lambda device: {"torch_copy": 1000.0, "triton_stream": 2000.0})
    monkeypatch.setattr(E, "nominal_gbps", lambda device: None)
    monkeypatch.setattr(E, "machine_info", lambda: {"date": "2026-12-03", "git_commit": "abc", "gpus": ["Fake GPU"]})
    monkeypatch.setattr(E, "IndexGuard", lambda device: IndexGuard(torch.device("cpu")))
    monkeypatch.setattr(E, "check_launch", check)
    monkeypatch.setattr(E, "_kernel", lambda spec, x, call, guard, launch: (launch, call.num_tokens))
    monkeypatch.setattr(E, "_compiled_call", lambda spec, x, call: (None, call.num_tokens))
    monkeypatch.setattr(E, "time_cuda_graph",
                        lambda fn, group, timing: 1.05 * (2.0 + fn[1] / 100) if fn[0] is None else fake_us(*fn))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=2))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(lt, "_GPU_NAMES", {})
    lt.reload()
    kinds = ("residual_rmsnorm", "fp8_group128_ue8m0+norm", "offset", "moe_prologue")
    cfg = E.EpilogueConfig(hidden=(hidden,), tokens=(1, 16, 2048, 4096), kinds=kinds, top_k=4)
    doc = E.run(cfg, "cpu", on_update=updates.append)
    lt.reload()

    assert len(updates) == 1 and doc["index_guard"] is None and doc["gpu"] == "Fake GPU"
    assert [f["launch"] for f in doc["failed"]] == [[1, 4, 0, True], [1, 4, 0, True]]  # once per swept kind
    timed = {tuple(m["launch"]) for m in doc["sweep"] + doc["measurements"] if m["launch"]}
    assert (1, 4, 0, True) not in timed and {tuple(E._launch_list(launch)) for launch in checked} >= timed
    assert doc["ranges"]["epilogue"][str(hidden)] == [[16, list(default[1:])], [None, [2, 8, 0, True]]]
    assert doc["ranges"]["moe_finalize"][str(hidden)] == [[16, list(split)], [None, list(nl.default_moe_launch(hidden))]]
    paths = {(m["kind"], m["tokens"]): set() for m in doc["measurements"]}
    for m in doc["measurements"]:
        paths[(m["kind"], m["tokens"])].add(m["path"])
    assert len(paths) == 4 * 4 and all(p == {"arfuse/default", "arfuse/tuned", "torch.compile"} for p in paths.values())
    tuned = {(m["kind"], m["tokens"]): tuple(m["launch"]) for m in doc["measurements"] if m["path"] == "arfuse/tuned"}
    assert tuned[("offset", 4096)] == (2, 8, 0, True) and tuned[("moe_prologue", 1)] == tuple(split)
    table = lt.parse(doc["launch_table"], "doc")
    assert [(e.kernel, e.gpu, e.dtype, e.hidden_size) for e in table.entries] == [
        ("epilogue", "Fake GPU", "bfloat16", hidden), ("moe_finalize", "Fake GPU", "bfloat16", hidden)]
    tuned_row, = [r for r in R.summary(doc, "arfuse/tuned") if r["kind"] == "offset"]
    default_row, = [r for r in R.summary(doc, "arfuse/default") if r["kind"] == "offset"]
    assert tuned_row["min_speedup"] == pytest.approx(1.05) and default_row["min_speedup"] == pytest.approx(1.05 / 1.2)


def test_tune_epilogue_sweeps_without_compile_and_writes_this_machines_table(monkeypatch, tmp_path, capsys):
    from arfuse.cli.main import main

    seen = {}

    def fake_run(cfg, device, progress):
        seen["cfg"] = cfg
        return _doc()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(E, "run", fake_run)
    out = tmp_path / "launch.json"
    monkeypatch.setenv(lt.PATH_ENV, str(out))
    assert main(["tune", "--epilogue", "--hidden", "5120", "--no-progress"]) in (0, None)
    cfg = seen["cfg"]
    assert not cfg.compare and cfg.hidden == (5120,) and cfg.tokens == E.DEFAULT_TOKENS
    assert cfg.kinds == (*E.SWEEP_KINDS, E.MOE_KIND)
    assert [(e.kernel, e.hidden_size) for e in lt.load(out).entries] == [("epilogue", 5120), ("moe_finalize", 5120)]
    assert "wrote 2 launch entries" in capsys.readouterr().out
    lt.reload()
