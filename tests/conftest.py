"""Test-suite wiring: ``gpu`` tests skip without enough CUDA devices, ``triton`` tests without Triton; the
``figure`` fixture collects the figures tests measure (fuzzed calls, selection cost) into one short section at
the end of the run instead of lines among pytest's dots. Multirank helpers live in tests/_ranks.py."""
import importlib.util
import os
from typing import Dict

import pytest
import torch

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)
# kernel launches from the shipped launch table only, whatever this machine's user has tuned (tests of the
# per-machine file set it themselves)
os.environ.setdefault("ARFUSE_LAUNCH_FILE", os.path.join(os.devnull, "launch.json"))  # can never exist

NO_TRITON = ("Triton is not installed (pip install -e '.[test]' brings it on Linux x86-64, or pip install "
             "triton)")
_FIGURES: Dict[str, str] = {}  # name -> its latest figure


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_triton = importlib.util.find_spec("triton") is not None
    for item in items:
        if item.get_closest_marker("triton") is not None and not has_triton:
            item.add_marker(pytest.mark.skip(reason=NO_TRITON))
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        need = marker.kwargs.get("min_gpus", 1)
        if n_gpus < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), found {n_gpus}"))


@pytest.fixture(scope="session")
def figure():
    """``figure(name, text)``: report a measured figure in the "arfuse figures" section at the end of the run (a
    later figure of the same name replaces the earlier one)."""
    return _FIGURES.__setitem__


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _FIGURES and config.get_verbosity() >= -1:  # shown with -q; -qq hides it
        terminalreporter.section("arfuse figures", sep="-")
        for name, text in _FIGURES.items():
            terminalreporter.write_line(f"{name}: {text}")
