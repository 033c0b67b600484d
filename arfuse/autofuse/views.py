"""Shape-only ops between the allreduce, the residual add and the RMSNorm: which ones keep the rows and their
element order (and so may sit inside a fused match), the pattern that looks through them, and the shape the fused
call's (tokens, hidden) outputs take back.

A reshape, view, squeeze or unsqueeze reads its input in row-major order, so it keeps every row of ``hidden``
elements whole and in order exactly when the last dim stays ``hidden`` on both sides; ``checks`` verifies that per
node. Ops that reorder or mix rows (transpose, permute, expand, slicing) are not looked through: a match stops at
them and ``explain`` names them.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch._inductor.pattern_matcher import MULTIPLE, FailedMatch, Match, PatternExpr, is_match
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

ROW_VIEW_OPS = frozenset({
    aten.reshape.default, aten.view.default, aten._unsafe_view.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
})
"""Ops that only reshape: looked through by :class:`RowViews` (each checked to keep the hidden dim)."""

REORDERING_OPS = frozenset({
    aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.index.Tensor, aten.flip.default, aten.roll.default, aten.as_strided.default,
    aten.repeat.default, aten.cat.default, aten.split.Tensor, aten.narrow.default,
})
"""Shape ops that reorder, drop, duplicate or mix rows: a fused call would not compute what they do."""


def is_row_view(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ROW_VIEW_OPS


def chain_below(node: torch.fx.Node) -> Tuple[torch.fx.Node, Tuple[torch.fx.Node, ...]]:
    """From ``node`` down through row views to the first other node: (that node, the views from it upward)."""
    chain = []
    while is_row_view(node):
        chain.append(node)
        node = node.args[0]
    return node, tuple(reversed(chain))


def _val(node) -> Optional[torch.Tensor]:
    meta = getattr(node, "meta", None)
    v = meta.get("val") if meta else None
    return v if isinstance(v, torch.Tensor) else None


def op_label(node: torch.fx.Node) -> str:
    target = getattr(node, "target", "a view")
    return str(getattr(target, "__name__", target))


def why_not_rows(chain: Sequence[torch.fx.Node], hidden) -> Optional[str]:
    """None when every view of ``chain`` keeps rows of ``hidden`` elements whole (the last dim stays ``hidden``),
    else what one does instead."""
    for node in chain:
        v = _val(node)
        if v is None:
            return f"{op_label(node)} without tensor metadata between the allreduce and the RMSNorm"
        if v.dim() < 1 or not statically_known_true(v.shape[-1] == hidden):
            return (f"{op_label(node)} to shape {tuple(v.shape)} between the allreduce and the RMSNorm changes the "
                    f"hidden dim {hidden}: rows would not stay whole")
    return None


def out_shape(target: torch.Tensor, like: Sequence[Tuple[str, torch.Tensor]]):
    """How the fused call's (tokens, hidden) output is viewed back to ``target``'s shape: the name of a tensor of
    ``like`` (inputs of the replacement, known there with their symbolic shapes) of the same shape, else a tuple
    of ints with at most one -1 for its one dynamic dim; None when neither can say it."""
    for name, t in like:
        if t is not None and t.dim() == target.dim() and all(statically_known_true(a == b)
                                                               for a, b in zip(t.shape, target.shape)):
            return name
    dims = [d if isinstance(d, int) else -1 for d in target.shape]
    return tuple(dims) if dims.count(-1) <= 1 else None


class RowViews(PatternExpr):
    """``inner``, then zero or more row views (:data:`ROW_VIEW_OPS`): matches ``inner`` however many reshapes,
    squeezes or unsqueezes follow it. The views go into the match (replaced with it) and into its keyword
    ``name`` (a tuple, innermost first) for ``checks`` and ``replace``.

    ``users``: the users the node seen by the consumer (the last view, or ``inner``'s node without views) must
    have. ``inner_is_output``: ``inner`` is an output of the pattern (the residual sum) and may have other users;
    otherwise its node feeds only the views when there are any.
    """

    def __init__(self, inner: PatternExpr, name: str, users, inner_is_output: bool = False) -> None:
        super().__init__()
        self.inner, self.name, self.users, self.inner_is_output = inner, name, users, inner_is_output

    def __repr__(self) -> str:
        return f"RowViews({self.inner!r}, {self.name!r}, users={self.users!r})"

    def _match(self, node, ctx):
        base, chain = chain_below(node)
        m = ctx.match(self.inner, base)
        if not is_match(m):
            return m
        if chain:
            if not self.inner_is_output and len(base.users) != 1:
                return FailedMatch("row views: {} has other users", base)
            if any(len(v.users) != 1 for v in chain[:-1]):
                return FailedMatch("row views: a view below {} has other users", node)
        checks_users = bool(chain) or not self.inner_is_output
        if checks_users and self.users is not MULTIPLE and len(node.users) != self.users:
            return FailedMatch("row views: {} has {} users, not {}", node, len(node.users), self.users)
        out = Match(ctx, self)
        out.extend(m)
        out.nodes.extend(chain)
        out.kwargs[self.name] = chain
        return out

    def pattern_eq(self, other) -> bool:
        return (super().pattern_eq(other) and self.name == other.name and self.users == other.users
                and self.inner_is_output == other.inner_is_output and self.inner.pattern_eq(other.inner))
