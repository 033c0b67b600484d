"""What the ``nccl`` backend needs of each rank, contributed to the group probe (``arfuse.probe.facts``): Triton
(its epilogue and MoE prologue are Triton kernels), read by its ``check_group`` as ``caps.triton``. Beside
``backends/nccl.py`` rather than in it: that module's code is part of the verification record's fingerprint."""
from __future__ import annotations

from arfuse.backends.nccl import NAME
from arfuse.probe.facts import FactSource, contribute, triton_facts

SOURCE = contribute(FactSource(NAME, triton_facts, names=("triton",)))
