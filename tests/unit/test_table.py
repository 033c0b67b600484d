"""Selection tables: loading rejects malformed or mismatched files with a message naming the file and the field,
a fusion object then falls back to the built-in defaults; the most specific entry wins; ``max_bytes`` ranges;
round trip, merge and atomic save; entries built from timings (the tuner's and the shipped defaults' source).
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

import arfuse
from arfuse.backends.base import Support, register, unregister
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.select import build, table
from arfuse.select.table import Entry, Range, TableError

HIDDEN = 64


def _doc(*entries):
    return {"format": table.FORMAT, "version": table.VERSION, "entries": list(entries)}


def _entry(**over):
    e = {"gpu": "cpu", "world_size": 1, "dtype": "float32", "hidden_size": HIDDEN,
         "ranges": [{"max_tokens": 8, "backend": "fake", "variant": "small"},
                    {"max_tokens": None, "backend": "torch_ref"}]}
    e.update(over)
    return e


def _range(**over):
    r = {"max_tokens": 8, "backend": "fake", "variant": "small"}
    r.update(over)
    return r


MALFORMED = [
    ("not JSON", "{format:", ("not valid JSON",)),
    ("top level a list", [], ("top level", "object")),
    ("wrong format tag", {"format": "other", "version": 1, "entries": []}, ("format", "arfuse-selection-table")),
    ("future version", {"format": table.FORMAT, "version": 2, "entries": []}, ("version", "2")),
    ("entries not a list", {"format": table.FORMAT, "version": 1, "entries": {}}, ("entries", "list")),
    ("entry not an object", _doc(3), ("entries[0]", "object")),
    ("missing ranges", _doc({k: v for k, v in _entry().items() if k != "ranges"}), ("entries[0]", "ranges")),
    ("empty ranges", _doc(_entry(ranges=[])), ("entries[0]", "empty")),
    ("unknown dtype", _doc(_entry(dtype="float8")), ("entries[0]", "dtype", "float8")),
    ("world size 0", _doc(_entry(world_size=0)), ("world_size", "> 0")),
    ("world size a bool", _doc(_entry(world_size=True)), ("world_size", "int")),
    ("hidden size negative", _doc(_entry(hidden_size=-8)), ("hidden_size", "> 0")),
    ("hidden size a string", _doc(_entry(hidden_size="8192")), ("hidden_size", "int")),
    ("typo in entry field", _doc(_entry(hidden=4096)), ("entries[0]", "unknown field", "'hidden'")),
    ("typo in range field", _doc(_entry(ranges=[_range(max_token=4)])), ("ranges[0]", "'max_token'")),
    ("both bounds", _doc(_entry(ranges=[_range(max_bytes=4096)])), ("ranges[0]", "not both")),
    ("bound not positive", _doc(_entry(ranges=[_range(max_tokens=0)])), ("max_tokens", "> 0")),
    ("bounds decrease", _doc(_entry(ranges=[_range(max_tokens=8), _range(max_tokens=4)])),
     ("ranges[1]", "increase")),
    ("unbounded range not last", _doc(_entry(ranges=[_range(max_tokens=None), _range(max_tokens=8)])),
     ("ranges[0]", "last")),
    ("mixed bound kinds", _doc(_entry(ranges=[_range(max_tokens=8), _range(max_tokens=None, max_bytes=1 << 20)])),
     ("mixes max_tokens and max_bytes",)),
    ("missing backend", _doc(_entry(ranges=[{"max_tokens": None}])), ("ranges[0]", "backend")),
    ("variant not a string", _doc(_entry(ranges=[_range(variant=3)])), ("variant", "str")),
    ("bad alternative", _doc(_entry(ranges=[_range(alternatives=["a/b/c"])])),
     ("alternatives[0]", "backend/variant", "a/b/c")),
    ("empty alternative", _doc(_entry(ranges=[_range(alternatives=[""])])), ("alternatives[0]",)),
    ("duplicate key", _doc(_entry(), _entry()), ("entries[1]", "repeats", "entries[0]")),
]


@pytest.mark.parametrize("label,content,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_rejected_with_a_clear_message(tmp_path, caplog, label, content, words):
    path = tmp_path / "tune.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TableError) as info:
        table.load(path)
    message = str(info.value)
    assert str(path) in message, message
    for w in words:
        assert w in message, f"{label}: {message!r} lacks {w!r}"
    with caplog.at_level(logging.WARNING, logger="arfuse"):
        assert table.load_tuned(path) is None
    assert any("using built-in defaults" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_missing_or_unreadable_file():
    with pytest.raises(TableError, match="cannot read"):
        table.load("/nonexistent/arfuse/tune.json")
    assert table.load_tuned("/nonexistent/arfuse/tune.json") is None


def test_shipped_defaults_are_valid():
    defaults = table.builtin_defaults()
    assert defaults.source == str(table.DEFAULTS_PATH)
    assert len({e.key for e in defaults.entries}) == len(defaults.entries)


# -- matching ---------------------------------------------------------------------------------------------------
def _e(gpu, hidden, backend, world=4, dtype="bfloat16", bound=None):
    return Entry(gpu, world, dtype, hidden, (Range(bound, None, ((backend, "default"),)),))


def test_most_specific_entry_wins():
    entries = [_e(None, None, "any_any"), _e("H200", None, "gpu_any"), _e(None, 8192, "any_hidden"),
               _e("H200", 8192, "gpu_hidden"), _e("H100", 8192, "other_gpu"),
               _e("H200", 8192, "other_world", world=2), _e("H200", 8192, "other_dtype", dtype="float16")]
    order = ["gpu_hidden", "any_hidden", "gpu_any", "any_any"]
    for expected in order:
        t = table.Table(tuple(entries), "test")
        got = t.match("H200", 4, torch.bfloat16, 8192)
        assert got is not None and got.ranges[0].backend == expected, (expected, got)
        entries = [e for e in entries if e.ranges[0].backend != expected]
    assert table.Table(tuple(entries), "test").match("H200", 4, torch.bfloat16, 8192) is None
    assert table.Table((_e("H200", 8192, "x"),), "t").match("H200", 8, torch.bfloat16, 8192) is None


def test_nearest_hidden_size_is_scaled_by_bytes():
    small = Entry("H200", 4, "bfloat16", 4096, (Range(64, None, (("a", "default"),)),
                                                  Range(None, None, (("b", "default"),))))
    far = Entry("H200", 4, "bfloat16", 1024, (Range(1, None, (("c", "default"),)),))
    other_gpu = Entry(None, 4, "bfloat16", 8192, (Range(1, None, (("d", "default"),)),))
    got = table.Table((far, small, other_gpu), "t").match("H200", 4, torch.bfloat16, 8192)
    # an entry whose gpu is null and hidden exact beats scaling
    assert got is other_gpu
    got = table.Table((far, small), "t").match("H200", 4, torch.bfloat16, 8192)
    assert got.scaled_from == 4096 and got.hidden_size == 8192
    bpt = 8192 * 2
    assert got.ranges[0].max_bytes == 64 * 4096 * 2 and got.bounds(bpt) == [32]
    assert got.choice(32, bpt) == ("a", "default") and got.choice(33, bpt) == ("b", "default")


def test_max_bytes_ranges():
    data = _doc(_entry(ranges=[{"max_bytes": 4096, "backend": "a", "alternatives": ["c/x", "a"]},
                               {"max_bytes": 65536, "backend": "b", "variant": "v"},
                               {"max_bytes": None, "backend": "c"}]))
    e = table.parse(data, "mem").entries[0]
    for bytes_per_token, last_a, last_b in ((256, 16, 256), (1024, 4, 64), (8192, 0, 8)):
        assert e.bounds(bytes_per_token) == [last_a, last_b]
        if last_a:
            assert e.choices(last_a, bytes_per_token) == (("a", "default"), ("c", "x"))
        assert e.choice(last_a + 1, bytes_per_token) == ("b", "v")
        assert e.choice(last_b, bytes_per_token) == ("b", "v")
        assert e.choice(last_b + 1, bytes_per_token) == ("c", "default")


def test_bounded_last_range_leaves_larger_sizes_to_priority():
    e = table.parse(_doc(_entry()), "t").entries[0]
    assert e.choices(8, HIDDEN * 4)[0] == ("fake", "small")
    assert e.choices(9, HIDDEN * 4) == (("torch_ref", "default"),)
    bounded = table.parse(_doc(_entry(ranges=[_range(max_tokens=8)])), "t").entries[0]
    assert bounded.choices(9, HIDDEN * 4) == ()


# -- files ------------------------------------------------------------------------------------------------------
def test_round_trip_merge_and_atomic_save(tmp_path):
    first = table.parse(_doc(_entry(), _entry(hidden_size=128, gpu=None)), "a")
    path = build.save(first, tmp_path / "sub" / "tune.json")
    assert table.load(path).entries == first.entries
    assert not list(path.parent.glob(".*.tmp"))
    replacement = Entry("cpu", 1, "float32", HIDDEN, (Range(None, None, (("torch_ref", "default"),)),), "new")
    extra = Entry("cpu", 2, "float32", HIDDEN, (Range(None, None, (("torch_ref", "default"),)),))
    merged = build.merged(table.load(path), [replacement, extra], str(path))
    build.save(merged, path)
    again = table.load(path)
    assert len(again.entries) == 3
    assert again.match("cpu", 1, torch.float32, HIDDEN) == replacement
    assert again.match("other", 1, torch.float32, 128).ranges == first.entries[1].ranges


def test_default_tune_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ARFUSE_TUNE_FILE", str(tmp_path / "x.json"))
    assert table.default_tune_path() == tmp_path / "x.json"
    monkeypatch.delenv("ARFUSE_TUNE_FILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert table.default_tune_path() == tmp_path / "arfuse" / "tune.json"


# -- a fusion object falls back to the built-in defaults ---------------------------------------------------------
class _Fake(TorchRefBackend):
    """torch_ref's math under another name, with a variant limited to 8 tokens."""

    name = "fake"
    variants = ("small", "any")
    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
    priority = 2000  # never first by priority: only a table makes it win

    def check_variant(self, problem, caps, variant):
        if variant == "small" and problem.num_tokens > 8:
            return "small is limited to 8 tokens"
        return None


@pytest.fixture
def fake_backend():
    register(_Fake())
    yield
    unregister("fake")


@pytest.fixture
def defaults(tmp_path, monkeypatch):
    """Built-in defaults that prefer fake/small up to 8 tokens (so their use is visible in the plans)."""
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps(_doc(_entry())))
    monkeypatch.setattr(table, "DEFAULTS_PATH", path)
    return path


def _plan(table_path, tokens):
    with arfuse.AllReduceFusion(max_tokens=32, hidden_size=HIDDEN, dtype=torch.float32, device="cpu",
                                table_path=table_path) as fusion:
        return fusion.plan("residual_rmsnorm", tokens)


@pytest.mark.parametrize("label,content,words", MALFORMED[:6] + MALFORMED[-3:], ids=lambda v: str(v)[:20])
def test_fusion_falls_back_to_defaults_on_a_bad_table(fake_backend, defaults, tmp_path, label, content, words):
    bad = tmp_path / "bad.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    plan = _plan(bad, 4)
    assert (plan.backend, plan.variant) == ("fake", "small") and plan.reason.startswith("defaults choice 1")
    assert _plan(bad, 9).backend == "torch_ref"


def test_mismatched_table_falls_back_to_defaults(fake_backend, defaults, tmp_path):
    other = tmp_path / "other.json"
    tuned = [_entry(gpu="NVIDIA H200", ranges=[{"max_tokens": None, "backend": "fake", "variant": "any"}]),
             _entry(world_size=2, ranges=[{"max_tokens": None, "backend": "fake", "variant": "any"}]),
             _entry(dtype="bfloat16", ranges=[{"max_tokens": None, "backend": "fake", "variant": "any"}])]
    other.write_text(json.dumps(_doc(*tuned)))
    assert _plan(other, 4).reason.startswith("defaults")
    matching = tmp_path / "matching.json"
    matching.write_text(json.dumps(_doc(_entry(ranges=[{"max_tokens": None, "backend": "fake", "variant": "any"}]))))
    plan = _plan(matching, 20)
    assert (plan.backend, plan.variant, plan.reason) == ("fake", "any", "tuned choice 1")


# -- entries from timings ----------------------------------------------------------------------------------------
def test_entry_from_timings_picks_the_fastest_with_stickiness():
    timings = {1: {"a": 5.0, "b": 9.0, "c/x": 7.0}, 2: {"a": 5.1, "b": 9.0, "c/x": 7.0},
               8: {"a": 10.1, "b": 10.0, "c/x": 12.0},  # b faster, but by < 2%: a keeps the range
               64: {"a": 30.0, "b": 20.0, "c/x": 25.0}, 2048: {"b": 300.0, "c/x": 200.0}}
    e = build.entry_from_timings(timings, gpu="G", world_size=2, dtype="bfloat16", hidden_size=1024, source="s")
    assert [(r.max_tokens, r.choices[0]) for r in e.ranges] == [(8, ("a", "default")), (64, ("b", "default")),
                                                               (None, ("c", "x"))]
    assert e.ranges[0].choices == (("a", "default"), ("c", "x"), ("b", "default"))
    assert e.ranges[2].choices == (("c", "x"), ("b", "default"))  # a was not measured at 2048
    assert table.parse(build.to_json(table.Table((e,), "t")), "t").entries == (e,)
    strict = build.entry_from_timings(timings, gpu="G", world_size=2, dtype="bfloat16", hidden_size=1024, sticky=0)
    assert strict.ranges[0].max_tokens == 2
    with pytest.raises(ValueError, match="no measured token count"):
        build.entry_from_timings({}, gpu="G", world_size=2, dtype="bfloat16", hidden_size=1)


def test_timings_by_shape_keeps_only_passing_arfuse_paths():
    base = {"gpu": "G", "world_size": 2, "dtype": "bfloat16", "hidden": 64, "tokens": 4, "us": 1.0}
    ms = [dict(base, path="a", kind="backend", status="ok"), dict(base, path="auto", kind="auto", status="ok"),
          dict(base, path="nccl+compiled_norm", kind="peer", status="ok"),
          dict(base, path="b", kind="backend", status="FAILED", us=None),
          dict(base, path="c", kind="backend", status="n/a", us=None)]
    assert build.timings_by_shape(ms) == {("G", 2, "bfloat16", 64): {4: {"a": 1.0}}}
