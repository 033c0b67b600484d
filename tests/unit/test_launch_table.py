"""Launch tables (``arfuse.kernels.launch_table``): the format's checks, which entry applies (per-machine file first,
then the shipped one; an equal GPU, then an equal dtype, over null), what the launchers take from them, and the
shipped table: today's launches, as ``arfuse tune --from-bench ... --write-defaults --any-gpu`` writes them."""
import json
import logging
from pathlib import Path

import pytest
import torch

from arfuse.kernels import launch_config as lc, launch_table as lt, nccl_launch as nl

REPO = Path(__file__).resolve().parents[2]
RUN1 = REPO / "bench/results/2026-12-02_h200x1/run1_epilogue_h200.json"


@pytest.fixture
def machine_file(monkeypatch, tmp_path):
    path = tmp_path / "launch.json"
    monkeypatch.setenv(lt.PATH_ENV, str(path))
    lt.reload()
    yield path
    lt.reload()


def _doc(*entries):
    return {"format": lt.FORMAT, "version": lt.VERSION, "entries": list(entries)}


def _entry(**kw):
    e = {"kernel": "epilogue", "gpu": None, "dtype": None, "hidden_size": 4096,
         "ranges": [{"max_tokens": None, "rows": 1, "num_warps": 4, "max_ctas": 0}]}
    e.update(kw)
    return e


@pytest.mark.parametrize("entry, words", [
    (_entry(kernel="norm"), "'kernel' must be one of"),
    (_entry(hidden_size=0), "'hidden_size' must be > 0"),
    (_entry(ranges=[]), "non-empty list"),
    (_entry(colour="red"), "unknown field(s) 'colour'"),
    (_entry(ranges=[{"max_tokens": None, "rows": 3, "num_warps": 4, "max_ctas": 0}]), "'rows' must be a power of two"),
    (_entry(ranges=[{"max_tokens": None, "rows": 1, "num_warps": 4}]), "missing field 'max_ctas'"),
    (_entry(ranges=[{"max_tokens": None, "rows": 1, "num_warps": 4, "max_ctas": 0, "slots": 4}]),
     "unknown field(s) 'slots' for kernel 'epilogue'"),
    (_entry(ranges=[{"max_tokens": None, "rows": 1, "num_warps": 4, "max_ctas": 0, "evict_first": 1}]),
     "'evict_first' must be true or false"),
    (_entry(ranges=[{"max_tokens": 64, "rows": 1, "num_warps": 4, "max_ctas": 0}]), "the last range"),
    (_entry(ranges=[{"max_tokens": 64, "rows": 1, "num_warps": 4, "max_ctas": 0},
                    {"max_tokens": 32, "rows": 1, "num_warps": 4, "max_ctas": 0},
                    {"max_tokens": None, "rows": 1, "num_warps": 4, "max_ctas": 0}]), "bounds must increase"),
    (_entry(kernel="moe_finalize", ranges=[{"max_tokens": None, "block_h": 1000, "num_warps": 4, "max_ctas": 0,
                                            "slots": 4}]), "'block_h' must be a power of two"),
    (_entry(kernel="moe_finalize", ranges=[{"max_tokens": None, "block_h": 1024, "num_warps": 4, "max_ctas": 0,
                                            "slots": 2}]), "'slots' must be 1, 4 or 8"),
])
def test_a_malformed_entry_is_refused_naming_the_field(entry, words):
    with pytest.raises(lt.LaunchTableError, match="entries\\[0\\]") as info:
        lt.parse(_doc(entry), "t.json")
    assert words in str(info.value)


def test_a_repeated_key_and_a_wrong_format_are_refused():
    with pytest.raises(lt.LaunchTableError, match="repeats the key"):
        lt.parse(_doc(_entry(), _entry()), "t.json")
    with pytest.raises(lt.LaunchTableError, match="'format' must be"):
        lt.parse({"format": "arfuse-selection-table", "version": 1, "entries": []}, "t.json")


def test_the_most_specific_entry_applies():
    table = lt.parse(_doc(_entry(), _entry(gpu="G"), _entry(dtype="bfloat16"), _entry(gpu="G", dtype="float16"),
                          _entry(hidden_size=8192, gpu="H")), "t.json")
    key = lambda e: (e.gpu, e.dtype)  # noqa: E731
    assert key(table.match("epilogue", 4096, "bfloat16", "G")) == ("G", None)  # an equal GPU first
    assert key(table.match("epilogue", 4096, "float16", "G")) == ("G", "float16")
    assert key(table.match("epilogue", 4096, "bfloat16", "other")) == (None, "bfloat16")
    assert key(table.match("epilogue", 4096, "float32", None)) == (None, None)
    assert table.match("epilogue", 8192, "bfloat16", "G") is None  # another GPU's entry never applies
    assert table.match("moe_finalize", 4096, "bfloat16", "G") is None


def test_the_machine_file_comes_first_and_ranges_pick_by_tokens(machine_file):
    moe = lt.make_entry("moe_finalize", 7168, [(16, dict(block_h=1024, num_warps=4, max_ctas=0, slots=8)),
                                               (None, dict(block_h=8192, num_warps=16, max_ctas=528, slots=4))])
    epi = lt.make_entry("epilogue", 4096, [(None, dict(rows=2, num_warps=8, max_ctas=0, evict_first=True))])
    lt.save(lt.Table((moe, epi), "test"), machine_file)
    assert nl.moe_launch(7168, 1) == nl.MoeLaunch(1024, 4, 0, 8) == nl.moe_launch(7168, 16, torch.bfloat16)
    assert nl.moe_launch(7168, 17) == nl.MoeLaunch(8192, 16, 528, 4)
    assert nl.moe_grid(3, 7168, nl.moe_launch(7168, 3)) == 21  # 7 tiles of 1024 columns per token
    assert nl.moe_launch(4096, 1) == nl.default_moe_launch(4096) == nl.MoeLaunch(4096, 8, lc.MAX_GRID, 4)
    assert nl.epilogue_launch(4096, 1) == nl.EpilogueLaunch(4096, 2, 8, 0, True)  # over the shipped entry
    assert nl.epilogue_launch(8192, 1) == nl.EpilogueLaunch(8192, 1, 16, 0)  # the shipped one


def test_a_malformed_machine_file_is_reported_once_and_ignored(machine_file, caplog):
    machine_file.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert nl.epilogue_launch(4096, 1) == nl.EpilogueLaunch(4096, 1, 4, 528)
        lt.reload()
        nl.epilogue_launch(4096, 2)
    assert "ignoring the launch table" in caplog.text and "not valid JSON" in caplog.text


def test_the_machine_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(lt.PATH_ENV, str(tmp_path / "x.json"))
    assert lt.machine_path() == tmp_path / "x.json"
    monkeypatch.delenv(lt.PATH_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lt.machine_path() == tmp_path / "arfuse" / "launch.json"


def test_the_shipped_table_holds_todays_launches_for_any_gpu(machine_file):
    table = lt.load(lt.DEFAULTS_PATH)
    got = {e.hidden_size: e.launches() for e in table.entries if e.kernel == "epilogue"}
    assert got == {4096: ((None, dict(rows=1, num_warps=4, max_ctas=528)),),
                   5120: ((None, dict(rows=1, num_warps=4, max_ctas=0)),),
                   7168: ((None, dict(rows=1, num_warps=16, max_ctas=0)),),
                   8192: ((None, dict(rows=1, num_warps=16, max_ctas=0)),)}
    assert all(e.gpu is None and e.dtype is None for e in table.entries)
    for hidden, n in ((4096, 16384), (7168, 1)):
        assert nl.epilogue_launch(hidden, n, torch.float16, -1) == nl.EpilogueLaunch(
            lc.next_power_of_2(hidden), *got[hidden][0][1].values())


def test_the_shipped_table_is_what_tune_writes_from_the_committed_results(monkeypatch, tmp_path, capsys):
    # the shipped file is data written by the tool, not edited by hand: regenerate it into a copy
    from arfuse.cli.main import main

    copy = tmp_path / "launch_table.json"
    monkeypatch.setattr(lt, "DEFAULTS_PATH", copy)
    assert main(["tune", "--from-bench", str(RUN1), "--write-defaults", "--any-gpu"]) in (0, None)
    assert json.loads(copy.read_text()) == json.loads((REPO / "arfuse/kernels/launch_table.json").read_text())
    lt.reload()
