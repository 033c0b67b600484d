"""What ``pip install`` gets: the declared license with its text, the package without the repository's pytest
wiring, matplotlib only for ``--plot``, and the test extra bringing what the tests need (checked on the project
file; building a wheel needs the network: ``pip wheel --no-deps .``)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_license_is_declared_in_spdx_form_and_shipped(project):
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires), requires
    assert not any(c.startswith("License ::") for c in project["project"]["classifiers"])  # SPDX replaces them


def test_no_pytest_wiring_inside_the_package():
    assert not list((ROOT / "arfuse").rglob("conftest.py"))


def test_matplotlib_is_only_in_the_plot_and_test_extras(project):
    deps = project["project"]["dependencies"]
    extras = project["project"]["optional-dependencies"]
    assert not any(d.startswith("matplotlib") for d in deps)
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    imports = [p for p in (ROOT / "arfuse").rglob("*.py") if re.search(r"^\s*(import|from) matplotlib", p.read_text(),
                                                                        re.M)]
    assert [p.relative_to(ROOT).as_posix() for p in imports] == ["arfuse/bench/plot.py"]


def test_the_test_extra_brings_triton_as_on_the_gpu_machine(project):
    test = project["project"]["optional-dependencies"]["test"]
    assert 'triton==3.6.0; platform_system == "Linux" and platform_machine == "x86_64"' in test

