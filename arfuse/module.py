"""``FusedAddRMSNorm``: the ``nn.Module`` a TP model swaps in for its post-attention / post-MLP norm."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from arfuse.api import AllReduceFusion
from arfuse.core import validate as v


class FusedAddRMSNorm(nn.Module):
    """Holds an RMSNorm's weight and eps and runs ``allreduce(x) + residual -> RMSNorm`` through ``fusion``.

    ``FusedAddRMSNorm(hidden_size, eps=1e-6, *, fusion, dtype=None, device=None, inplace_residual=False,
    weight_offset=0.0)``.
    ``fusion`` is required: the :class:`AllReduceFusion` of the TP group, sized for this norm (a model builds
    one and shares it between all its norms; building one is collective, so it cannot happen lazily inside a
    forward). ``hidden_size``, ``eps``, ``dtype`` and ``device`` are checked against it at construction.

    ``forward(x, residual)`` returns ``(normed, new_residual)``; ``forward(x)`` (no residual) returns
    ``rmsnorm(allreduce(x))``. ``x`` may have leading batch dimensions; they are flattened to tokens.
    ``inplace_residual=True`` updates ``residual`` in place. ``weight_offset``: the norm multiplies by
    ``weight + weight_offset`` (1.0 for Gemma-style norms, whose weights are stored around 0). Collective;
    graph-capturable; compiles.

    >>> fusion = AllReduceFusion(max_tokens=8, hidden_size=16, dtype=torch.float32, device="cpu")
    >>> norm = FusedAddRMSNorm(16, eps=1e-6, fusion=fusion, dtype=torch.float32)
    >>> y, r = norm(torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    >>> y.shape, r.shape
    (torch.Size([2, 3, 16]), torch.Size([2, 3, 16]))
    >>> fusion.close()
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, fusion: AllReduceFusion,
                 dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None,
                 inplace_residual: bool = False, weight_offset: float = 0.0):
        super().__init__()
        op = "FusedAddRMSNorm"
        if not isinstance(fusion, AllReduceFusion):
            raise TypeError(f"{op}: fusion must be an AllReduceFusion, got {type(fusion).__name__}")
        self.eps = v.check_module_args(op, fusion.capacity, hidden_size, eps, dtype, device, inplace_residual)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=fusion.capacity.dtype,
                                              device=fusion.capacity.device))
        self.weight_offset = v.check_weight_offset(op, weight_offset)
        self.fusion = fusion
        self.inplace_residual = inplace_residual

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedAddRMSNorm: x must be a torch.Tensor of shape (..., hidden), got {type(x).__name__}")
        shape = x.shape
        if not shape:
            raise ValueError("FusedAddRMSNorm: x must have shape (..., hidden), got a 0-D tensor")
        flat = len(shape) == 2  # (tokens, hidden) already: no views to make and undo
        weight = self._parameters.get("weight")  # what self.weight reads, without nn.Module's attribute lookup
        if weight is None:  # parametrized, or re-registered as a buffer: the attribute knows
            weight = self.weight
        if residual is None:
            out = self.fusion.rmsnorm(x if flat else x.reshape(-1, shape[-1]), weight, self.eps,
                                      weight_offset=self.weight_offset)
            return out if flat else out.view(shape)
        if not isinstance(residual, torch.Tensor) or residual.shape != shape:
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"FusedAddRMSNorm: residual must have x's shape {tuple(shape)}, got {got}")
        inplace = self.inplace_residual
        if inplace and not residual.is_contiguous():
            raise ValueError("FusedAddRMSNorm: with inplace_residual=True, residual must be contiguous (a strided "
                             "residual would be updated in a copy)")
        if flat:
            normed, res = self.fusion.residual_rmsnorm(x, residual, weight, self.eps,
                                                       weight_offset=self.weight_offset, inplace=inplace)
            return normed, (residual if inplace else res)
        normed, res = self.fusion.residual_rmsnorm(x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]),
                                                   weight, self.eps, weight_offset=self.weight_offset, inplace=inplace)
        return normed.view(shape), (residual if inplace else res.view(shape))

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset:g}" if self.weight_offset else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{offset}, inplace_residual={self.inplace_residual}"
