"""What ``pip install`` gets: the declared license with its text, the package without the repository's pytest
wiring, matplotlib only for ``--plot``, the test extra bringing what the tests need, and lower bounds only (the
ones arfuse checks at run time). Checked on the project file (building a wheel needs the network:
``pip wheel --no-deps .``)."""
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


def _requirements(project):
    yield from project["project"]["dependencies"]
    for extra in project["project"]["optional-dependencies"].values():
        yield from extra


def test_every_requirement_is_a_lower_bound_never_an_exact_pin(project):
    for requirement in _requirements(project):
        spec = requirement.split(";")[0]
        assert re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9.]+", spec.strip()), requirement  # no ==, ~=, < or bare name


def test_the_declared_floors_are_the_ones_arfuse_checks_at_run_time(project):
    from arfuse.core.requirements import MINIMUM

    floors = {}
    for requirement in _requirements(project):
        name, floor = requirement.split(";")[0].strip().split(">=")
        floors.setdefault(name, set()).add(floor)
    assert {name: floors[name] for name in MINIMUM} == {name: {v} for name, v in MINIMUM.items()}, floors


def test_the_test_extra_brings_triton_on_linux_x86_64(project):
    test = project["project"]["optional-dependencies"]["test"]
    assert any(r.startswith("triton>=") and r.endswith('; platform_system == "Linux" and platform_machine == "x86_64"')
               for r in test), test
