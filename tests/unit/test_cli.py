"""The command line as a newcomer meets it: every mistake is one line on stderr naming the flag, exit code 2,
within seconds and before any rank is spawned; every flag documents itself and its default; ``python -m arfuse``
and ``--version`` work."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import arfuse
from arfuse.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()

# (argv, the flag the one line must name)
MISTAKES = [
    (["nosuch"], "COMMAND"),
    (["demo", "--ranks", "0"], "--ranks"),
    (["demo", "--backend", "nosuch"], "--backend"),
    (["demo", "--backend", "triton_symm/nosuch"], "--backend"),
    (["demo", "--dtype", "int8"], "--dtype"),
    (["demo", "--tokens", "0,4"], "--tokens"),
    (["demo", "--tokens", "a"], "--tokens"),
    (["demo", "--hidden", "-1"], "--hidden"),
    (["demo", "--hidden-size", "0"], "--hidden-size"),
    (["demo", "--iters", "x"], "--iters"),
    (["demo", "--device", "tpu"], "--device"),
    (["doctor", "--tokens", "0"], "--tokens"),
    (["doctor", "--hidden", "0"], "--hidden"),
    (["doctor", "--dtype", "int8"], "--dtype"),
    (["bench", "--backends", "nosuch"], "--backends"),
    (["bench", "--backends", "torch_ref,nosuch"], "--backends"),
    (["bench", "--no-peers", "--backends", "gloo+norm"], "--backends"),
    (["bench", "--tokens", "0"], "--tokens"),
    (["bench", "--hidden", "0"], "--hidden"),
    (["bench", "--dtype", "bf16,int8"], "--dtype"),
    (["bench", "--world-sizes", "0"], "--world-sizes"),
    (["bench", "--replays", "0"], "--replays"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--cpu-repeats", "0"], "--cpu-repeats"),
    (["bench", "--timeout", "0"], "--timeout"),
    (["bench", "--timeout", "inf"], "--timeout"),
    (["bench", "--seed", "-1"], "--seed"),
    (["bench", "--table", "/nonexistent/tune.json"], "--table"),
    (["bench", "--from-json", "/nonexistent/bench.json"], "--from-json"),
    (["bench", "--host", "--hidden", "256,512"], "--hidden"),
    (["bench", "--host", "--tokens", "1,8"], "--tokens"),
    (["bench", "--host", "--backends", "auto"], "--backends"),
    (["bench", "--host", "--json", f"{__file__}/host.json"], "--json"),
    (["bench", "--calls", "0"], "--calls"),
    (["bench", "--samples", "0"], "--samples"),
    (["tune", "--backends", "auto"], "--backends"),
    (["tune", "--backends", "peers"], "--backends"),
    (["tune", "--write-defaults"], "--write-defaults"),
    (["tune", "--from-bench", "/nonexistent/bench.json"], "--from-bench"),
    (["tune", "--any-gpu"], "--any-gpu"),
    (["tune", "--epilogue", "--from-bench", "/nonexistent/bench.json"], "--epilogue"),
    (["tune", "--from-bench", "x.json", "--write-defaults", "--launch-out", "/tmp/l.json"], "--launch-out"),
    (["tune", "--launch-out", f"{__file__}/launch.json"], "--launch-out"),
    (["bench", "--launch-table", "/tmp/launch.json"], "--launch-table"),
    (["bench", "--epilogue", "--launch-table", f"{__file__}/launch.json"], "--launch-table"),
    (["tune", "--tokens", "1,-2"], "--tokens"),
    (["tune", "--out", f"{__file__}/tune.json"], "--out"),  # a file where a folder should be
    (["bench", "--json", f"{__file__}/bench.json"], "--json"),
    (["bench", "--plot", "/"], "--plot"),
    (["e2e", "--json", f"{__file__}/e2e.json"], "--json"),
    (["e2e", "--tp", "0"], "--tp"),
    (["e2e", "--device", "cpu", "--tp", "3"], "--tp"),
    (["e2e", "--backends", "nosuch"], "--backends"),
    (["e2e", "--backends", "auto,unfused,nccl/nosuch"], "--backends"),
    (["e2e", "--preset", "big"], "--preset"),
    (["e2e", "--layers", "0"], "--layers"),
    (["e2e", "--kv-len", "0"], "--kv-len"),
    (["e2e", "--prompt-lens", "0"], "--prompt-lens"),
    (["e2e", "--batches", "x"], "--batches"),
    (["e2e", "--prefill-repeats", "0"], "--prefill-repeats"),
    (["e2e", "--decode-replays", "0"], "--decode-replays"),
    (["e2e", "--check-steps", "0"], "--check-steps"),
    (["e2e", "--timeout", "-1"], "--timeout"),
    (["e2e", "--seed", "x"], "--seed"),
    (["e2e", "--dtype", "int8"], "--dtype"),
    (["e2e", "--rank-shapes-of", "0"], "--rank-shapes-of"),
    (["e2e", "--device", "cpu", "--rank-shapes-of", "3"], "--rank-shapes-of"),
    (["e2e", "--rank-shapes-of", "2", "--tp", "2"], "--rank-shapes-of"),
]
CPU_ONLY_MISTAKES = [
    (["demo", "--device", "cuda"], "--device"),
    (["bench", "--device", "cuda"], "--device"),
    (["tune", "--device", "cuda"], "--device"),
    (["tune", "--epilogue"], "--epilogue"),
    (["e2e", "--device", "cuda"], "--device"),
    (["e2e", "--device", "cpu", "--graph-prefill"], "--graph-prefill"),
]


@pytest.fixture
def no_spawn(monkeypatch):
    """A mistake must be caught before any rank starts."""
    from arfuse import launch

    def refuse(*args, **kwargs):
        raise AssertionError("ranks were spawned for a command-line mistake")

    monkeypatch.setattr(launch, "run_ranks", refuse)


def _one_line_error(argv, capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    took = time.monotonic() - start
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert info.value.code == 2, (argv, info.value.code, captured.err)
    assert len(lines) == 1, (argv, captured.err)
    assert captured.out == "", (argv, captured.out)
    assert "Traceback" not in captured.err
    assert took < 10, f"{argv}: {took:.1f} s"
    return lines[0]


@pytest.mark.parametrize("argv,flag", MISTAKES + (CPU_ONLY_MISTAKES if NO_CUDA else []),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_mistake_is_one_line_naming_the_flag_exit_2(argv, flag, capsys, no_spawn):
    line = _one_line_error(argv, capsys)
    assert line.startswith("arfuse"), line
    assert flag in line, (flag, line)


def test_unknown_backend_lists_the_choices(capsys, no_spawn):
    line = _one_line_error(["bench", "--backends", "nosuch"], capsys)
    for choice in ("torch_ref", "triton_symm/lamport", "auto", "gloo+norm", "peers"):
        assert choice in line, (choice, line)
    line = _one_line_error(["e2e", "--backends", "nosuch"], capsys)
    assert "unfused" in line and "auto" in line and "peers" not in line, line


def test_plot_without_matplotlib_is_refused_before_measuring(capsys, no_spawn, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "matplotlib" else real(name, *a, **k))
    line = _one_line_error(["bench", "--plot", "out.png"], capsys)
    assert "--plot" in line and "pip install 'arfuse[plot]'" in line, line


def test_dtype_spellings_are_the_same_everywhere():
    parser = cli.build_parser()
    for command in ("demo", "doctor", "e2e"):
        for given, canonical in (("bf16", "bfloat16"), ("float16", "float16"), ("fp32", "float32")):
            assert parser.parse_args([command, "--dtype", given]).dtype == canonical
    for command in ("bench", "tune"):
        assert parser.parse_args([command, "--dtype", "bf16,float32,fp32"]).dtype == ("bfloat16", "float32")
        assert parser.parse_args([command, "--hidden-size", "512,256"]).hidden == (256, 512)
    assert parser.parse_args(["doctor", "--hidden-size", "512"]).hidden == 512  # the old spelling still works


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_has_help_showing_its_default():
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"arfuse {name} {flag}: no help"
            assert "default" in action.help, f"arfuse {name} {flag}: help shows no default: {action.help!r}"


def test_no_help_text_points_to_a_file_that_is_not_in_the_repository():
    parser = cli.build_parser()
    texts = [parser.format_help()] + [sub.format_help() for sub in _subparsers(parser).values()]
    for text in texts:
        for name in re.findall(r"\b[A-Z][A-Z_]+\.md\b", text):
            assert (ROOT / name).exists(), name


def _python_m_arfuse(*argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "arfuse", *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def test_python_dash_m_arfuse_and_version():
    proc = _python_m_arfuse("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"arfuse {arfuse.__version__}"
    proc = _python_m_arfuse("demo", "--ranks", "0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "arfuse.__version__" }' in text
    assert not re.search(r'^version\s*=\s*"', text, re.M), "a second, static version in pyproject.toml"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", arfuse.__version__)


def test_no_command_or_an_unknown_flag_is_one_line_naming_the_command(capsys):
    for argv, expected in (([], "arfuse: error: a command is required: one of demo, doctor, bench, tune, e2e"),
                           (["demo", "--nope"], "arfuse demo: error: unrecognized arguments: --nope (see arfuse "
                                                "demo --help)")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(expected), err
