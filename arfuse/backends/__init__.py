"""Backends register themselves on import, and contribute the facts they need of each rank to the group probe
(``arfuse.probe.facts``). Optional dependencies (Triton, FlashInfer) are imported lazily inside each backend, so
importing this package never fails for their absence."""
from arfuse.backends import torch_ref  # noqa: F401  (the oracle: always registered, always first)
from arfuse.backends import nccl, nccl_facts, triton_symm  # noqa: F401
from arfuse.backends import flashinfer, flashinfer_facts  # noqa: F401  (FlashInfer is imported lazily, on probe)
