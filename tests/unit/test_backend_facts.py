"""A backend brings the facts it needs to the group probe itself (``arfuse.probe.facts``): this file adds a backend,
with a fact of its own and an agreement rule of its own, and touches nothing in arfuse - its module (this file)
and its registration are all it takes. On one rank and on 2 gloo ranks: the facts land in ``GroupCaps.facts``
under the backend's name, agreed across ranks, with per-rank notes; selection runs the backend where its fact
holds and says why not where it does not."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import arfuse
from arfuse.backends.base import Support, register, unregister
from arfuse.backends.torch_ref import TorchRefBackend
from arfuse.core.spec import RESIDUAL_RMSNORM
from arfuse.probe import facts
from arfuse.probe.facts import FactSource, LocalFacts
from tests._ranks import launch

NAME = "test_widget"
MISSING_ON = "ARFUSE_TEST_WIDGET_MISSING_ON"  # a rank number: that rank has no widget


class WidgetBackend(TorchRefBackend):
    """The reference math under another name, runnable only where every rank has a widget."""

    name = NAME
    priority = 5
    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def check_group(self, caps):
        if not caps.fact("widget"):
            return f"no widget on every rank ({caps.note('widget')})"
        return None


def widget_facts(device: torch.device) -> LocalFacts:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    has = os.environ.get(MISSING_ON) != str(rank)
    return LocalFacts({"widget": has, "widgets": 2 if has else 0}, () if has else ("widget: none on this rank",))


def total_widgets(mine: LocalFacts, every):
    """A rule of this backend's own: ``widget`` on every rank, and the group's total count."""
    return {"widget": all(f["widget"] for f in every), "widgets": sum(f["widgets"] for f in every)}, ()


@contextlib.contextmanager
def widget_backend():
    register(WidgetBackend())
    facts.contribute(FactSource(NAME, widget_facts, total_widgets, names=("widget", "widgets")))
    try:
        yield
    finally:
        facts.withdraw(NAME)
        unregister(NAME)


def _run(rank, world):
    with widget_backend():
        fusion = arfuse.AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu")
        x = torch.full((4, 16), float(rank + 1))
        norm, res = fusion.residual_rmsnorm(x, torch.zeros(4, 16), torch.ones(16))
        found = dict(facts=fusion.caps.facts[NAME], notes=list(fusion.caps.notes),
                     plan=fusion.plan(RESIDUAL_RMSNORM, 4), calls=fusion.stats()["calls"],
                     summed=float(res[0, 0]))
        fusion.close()
    return found


def test_a_backend_s_own_fact_reaches_the_group_caps_and_selection():
    got = _run(0, 1)
    assert got["facts"] == {"widget": True, "widgets": 2}
    assert got["plan"].backend == NAME and got["calls"] == {NAME: 1}
    assert facts.sources()[-1].owner != NAME  # withdrawn again


@pytest.mark.parametrize("missing_on", [None, "1"])
def test_every_rank_agrees_on_the_fact_by_the_backend_s_own_rule(missing_on, monkeypatch):
    if missing_on is None:
        monkeypatch.delenv(MISSING_ON, raising=False)
    else:
        monkeypatch.setenv(MISSING_ON, missing_on)
    per_rank = launch(_run, 2)
    for got in per_rank:
        assert got["summed"] == 3.0  # 1 + 2: the call ran collectively either way
        if missing_on is None:
            assert got["facts"] == {"widget": True, "widgets": 4} and got["plan"].backend == NAME
        else:
            assert got["facts"] == {"widget": False, "widgets": 2}
            assert got["plan"].backend == "torch_ref"
            assert "widget: rank 1: none on this rank" in got["notes"]


def test_caps_read_declared_facts_and_refuse_other_names():
    import arfuse.backends  # noqa: F401  (registers the sources)
    from arfuse.core.types import GroupCaps

    caps = GroupCaps(2, 0, "cuda", facts={"triton_symm": {"symm_mem": True, "triton": False}})
    assert caps.symm_mem is True and caps.triton is False and caps.flashinfer is None  # declared, not contributed
    with pytest.raises(AttributeError, match="no field or declared fact 'p2pp'"):
        caps.p2pp
    assert not hasattr(caps, "symm_mem_typo")
    with widget_backend():
        assert GroupCaps(1, 0, "cpu", facts={NAME: {"widgets": 3}}).widgets == 3
