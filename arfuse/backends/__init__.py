"""Backends register themselves on import. Optional dependencies (Triton, FlashInfer) are imported lazily
inside each backend, so importing this package never fails for their absence."""
from arfuse.backends import torch_ref  # noqa: F401  (the oracle: always registered, always first)
from arfuse.backends import nccl, triton_symm  # noqa: F401
from arfuse.backends import flashinfer  # noqa: F401  (FlashInfer itself is imported lazily, on first probe)
