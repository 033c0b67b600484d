"""``arfuse bench --epilogue`` without a GPU: the bytes each kind must move, the launch sweep's space and choice, the
target check and the tables from a synthetic document, and the CLI's refusal without CUDA."""
import io

import pytest
import torch

from arfuse.bench import epilogue as E, epilogue_report as R
from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout
from arfuse.kernels import launch_config as lc


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
    assert space[0] == lc.default_epilogue_launch(hidden) and len(set(space)) == len(space)
    for launch in space[1:]:
        assert 8 <= launch.rows * launch.block_h // (32 * launch.num_warps) <= 64
        assert launch.max_ctas in (4 * 132, 8 * 132, 0)


def _m(hidden, kind, tokens, launch, us, path="arfuse"):
    return {"hidden": hidden, "kind": kind, "tokens": tokens, "launch": list(launch), "us": us, "path": path,
            "pct_hbm": 90.0}


def test_recommend_minimises_the_worst_ratio_to_the_best_launch():
    a, b, c = (1, 16, 528), (2, 8, 0), (4, 8, 0)
    sweep = [_m(8192, "k", 1, a, 3.0), _m(8192, "k", 1, b, 3.3), _m(8192, "k", 1, c, 2.0),
             _m(8192, "k", 4096, a, 100.0), _m(8192, "k", 4096, b, 90.0), _m(8192, "k", 4096, c, 180.0)]
    chosen = E.recommend(sweep)[8192]
    assert chosen["launch"] == list(a) and chosen["worst_ratio"] == pytest.approx(1.5)  # b 1.65, c 2.0
    sweep[-1]["us"] = 95.0  # now c is worst 1.06 ...
    assert E.recommend(sweep)[8192]["launch"] == list(c)
    assert E.recommend(sweep[:-1])[8192]["launch"] == list(a)  # ... but lacking a point it is never chosen


def _doc():
    ms = []
    for tokens, ours, compiled, pct in ((1, 3.0, 4.0, 1.0), (1024, 20.0, 25.0, 88.0), (16384, 300.0, 290.0, 80.0)):
        ms.append(dict(_m(5120, "residual_rmsnorm", tokens, (1, 16, 528), ours, "arfuse/default"), pct_hbm=pct))
        ms.append(dict(_m(5120, "residual_rmsnorm", tokens, (2, 8, 0), ours * 0.9, "arfuse/recommended"),
                       pct_hbm=pct / 0.9))
        ms.append(dict(_m(5120, "residual_rmsnorm", tokens, (), compiled, "torch.compile"), launch=None))
    return {"format": E.FORMAT, "hbm_gbps": 4000.0, "measurements": ms, "failed": [], "sweep": [],
            "recommended": {"5120": {"launch": [2, 8, 0], "worst_ratio": 1.05}},
            "config": {"hidden": [5120], "tokens": [1, 1024, 16384], "dtype": "bfloat16",
                       "kinds": {"residual_rmsnorm": "residual_rmsnorm"}, "timing": "cuda-graph"}}


def test_summary_checks_both_targets_per_launch():
    default, = [r for r in R.summary(_doc(), "arfuse/default")]
    assert default["min_pct_hbm"] == 80.0 and default["at_tokens"] == 16384
    assert default["min_speedup"] == pytest.approx(290 / 300) and not default["meets_targets"]
    rec, = R.summary(_doc(), "arfuse/recommended")
    assert rec["min_pct_hbm"] == pytest.approx(80 / 0.9) and rec["meets_targets"]


def test_report_prints_tables_and_the_launch_table_line():
    from rich.console import Console

    buf = io.StringIO()
    R.print_report(_doc(), Console(file=buf, width=200))
    text = buf.getvalue()
    assert "hidden 5120" in text and "EPILOGUE_LAUNCH = {5120: (2, 8, 0)}" in text and "1.39x" in text  # the recommended launch, 25 / 18 µs


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
