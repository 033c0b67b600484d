"""A torch, Triton or transformers older than arfuse supports is refused in one line naming the package, the version
found and the version needed: at ``import arfuse`` (torch), in the device probe that the Triton backends read
(Triton), and when an HF helper or ``arfuse e2e --model hf:...`` first needs transformers."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arfuse.backends import base

from arfuse.core import requirements
from arfuse.core.requirements import MINIMUM, UnsupportedVersionError

ROOT = Path(__file__).resolve().parents[2]


def _older(package: str) -> str:
    """A release just below the floor of ``package``."""
    major, minor = requirements.release(MINIMUM[package])[:2]
    return f"{major}.{minor - 1}.0" if minor else f"{major - 1}.99.0"


def _fake_version(monkeypatch, package: str, version: str):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == package else real(name))


@pytest.mark.parametrize("package", sorted(MINIMUM))
def test_a_release_below_the_floor_is_named_in_one_line(package):
    old = _older(package)
    message = requirements.problem(package, old)
    assert message and "\n" not in message
    assert f"{package} >= {MINIMUM[package]}" in message and message.endswith(f"found {old}")
    with pytest.raises(UnsupportedVersionError, match=f"found {old}$"):
        requirements.require(package, old)


@pytest.mark.parametrize("package", sorted(MINIMUM))
def test_the_floor_and_newer_releases_pass_whatever_their_labels(package):
    floor = MINIMUM[package]
    for version in (floor, floor + ".0+cpu", floor + "rc1", "99.0", "99.0.0.dev20270101+cu130"):
        assert requirements.problem(package, version) is None, version


def test_unknown_packages_and_unreadable_versions():
    with pytest.raises(ValueError, match="package"):
        requirements.problem("numpy", "1.0")
    assert requirements.problem("torch", "unknown") is None  # nothing to compare: not refused
    with pytest.raises(ValueError, match="version"):
        requirements.release("dev")


def test_import_arfuse_with_a_too_old_torch_says_so_in_one_line():
    old = _older("torch")
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            f"m.version = lambda name: {old!r} if name == 'torch' else real(name)\n"
            "import arfuse\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"arfuse.core.requirements.UnsupportedVersionError: arfuse needs torch >= {MINIMUM['torch']}, "
                    f"found {old}"), done.stderr


def test_a_too_old_triton_is_a_probe_note_the_triton_backends_report(monkeypatch):
    from arfuse.backends.nccl import NcclNormBackend
    from arfuse.core.types import GroupCaps
    from arfuse.probe import facts

    pytest.importorskip("triton")
    old = _older("triton")
    _fake_version(monkeypatch, "triton", old)
    local = facts.triton_facts(torch.device("cuda", 0))  # the fact the Triton backends contribute to the probe
    assert local.values == {"triton": False}
    note = f"triton: arfuse's Triton kernels need triton >= {MINIMUM['triton']}, found {old}"
    assert local.notes == (note,)
    caps = GroupCaps(world_size=1, rank=0, device_type="cuda", dist_backend="nccl", sm=(9, 0),
                     facts={"nccl": dict(local.values), "triton_symm": dict(local.values, symm_mem=True)},
                     notes=local.notes)
    # the reason carries the version note (nccl's wording waits for its next GPU verification:
    # bench/pending/launch_triton_api_check.patch)
    assert NcclNormBackend().check_group(caps).endswith(f"({note})")
    assert base.get("triton_symm").check_group(caps) is not None
    _fake_version(monkeypatch, "triton", MINIMUM["triton"])
    assert facts.triton_facts(torch.device("cuda", 0)) == facts.LocalFacts({"triton": True})


def test_a_too_old_transformers_is_refused_by_the_hf_helpers_and_the_cli(monkeypatch, capsys):
    pytest.importorskip("transformers")
    from arfuse.cli.main import main
    from arfuse.models import hf

    old = _older("transformers")
    _fake_version(monkeypatch, "transformers", old)
    expected = f"arfuse's HF model helpers need transformers >= {MINIMUM['transformers']}, found {old}"
    with pytest.raises(UnsupportedVersionError, match=expected):
        hf.config("llama")
    with pytest.raises(SystemExit) as info:
        main(["e2e", "--model", "hf:llama", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
