"""Reading a post-grad graph for the report: which collectives it holds, where they come from, and, for one the
pass left alone, why (the first thing in ``allreduce -> residual add -> RMSNorm`` that does not fit, looking
through row views as the patterns do)."""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch

from arfuse.autofuse import views
from arfuse.autofuse.checks import val
from arfuse.autofuse.patterns import ALL_REDUCE, CONVERT, WAIT
from arfuse.core.validate import SUPPORTED_DTYPES, dtype_name

aten = torch.ops.aten
_SHORT = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
          "all_to_all_single": "all_to_all", "all_reduce_coalesced": "all_reduce_coalesced"}
_PREFIX = re.compile(r"^L\['[^']*'\](\[\d+\])?\.?")
_NON_COLLECTIVES = ("wait_tensor",)


def is_collective(node: torch.fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.namespace in ("_c10d_functional", "c10d_functional", "c10d")
            and target._overloadpacket.__name__ not in _NON_COLLECTIVES)


def collectives(graph: torch.fx.Graph) -> List[torch.fx.Node]:
    return [n for n in graph.nodes if is_collective(n)]


def op_name(node: torch.fx.Node) -> str:
    return node.target._overloadpacket.__name__


def where(node: torch.fx.Node) -> str:
    """The module the node was traced in (``model.layers.0.self_attn.o_proj``), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _PREFIX.sub("", str(path))


def _module_class(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return getattr(cls, "__name__", str(cls))


def from_embedding(node: torch.fx.Node) -> bool:
    """Whether an allreduce sums an embedding lookup (vocabulary-parallel embedding)."""
    if "Embedding" in _module_class(node):
        return True
    current = node.args[0] if node.args else None
    for _ in range(6):
        if not isinstance(current, torch.fx.Node) or current.op != "call_function":
            return False
        if current.target in (aten.embedding.default,):
            return True
        tensor_args = [a for a in current.args if isinstance(a, torch.fx.Node)]
        current = tensor_args[0] if tensor_args else None
    return False


def describe(node: torch.fx.Node) -> dict:
    v = val(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
    group = next((a for a in reversed(node.args) if isinstance(a, str)), None)
    return {"node": node.name, "op": op_name(node), "where": where(node),
            "shape": [str(s) for s in v.shape] if v is not None else None,
            "dtype": dtype_name(v.dtype) if v is not None else None, "group": group}


def _targets(nodes) -> str:
    names = sorted({"graph output" if n.op == "output" else str(getattr(n.target, "__name__", n.target))
                    for n in nodes})
    return ", ".join(names)


def _next(node: torch.fx.Node, target) -> Optional[torch.fx.Node]:
    return next((u for u in node.users if u.op == "call_function" and u.target in target), None)


def _through_views(node: torch.fx.Node) -> Tuple[torch.fx.Node, Tuple[torch.fx.Node, ...]]:
    """From ``node`` up through row views that are its only user: (the last of them, the views)."""
    chain = []
    while len(node.users) == 1 and views.is_row_view(next(iter(node.users))):
        node = next(iter(node.users))
        chain.append(node)
    return node, tuple(chain)


def _reordering(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next((u for u in node.users if u.op == "call_function" and u.target in views.REORDERING_OPS), None)


def _layer_norm(node: torch.fx.Node) -> bool:
    up = _next(node, (CONVERT,)) or node
    return _next(up, (aten.var_mean.correction, aten.native_layer_norm.default)) is not None


def norm_blocker(h: torch.fx.Node, h_is_output: bool) -> Optional[str]:
    """If an RMSNorm of ``h`` (or of row views of it) follows: ``""`` when nothing blocks it, else which of its
    nodes has other users. None when no RMSNorm follows ``h``. ``h_is_output``: ``h`` may have users outside the
    norm."""
    if h_is_output and len(h.users) > 1:
        viewed = next((u for u in h.users if views.is_row_view(u)), None)
        if viewed is not None and _next(h, (CONVERT, aten.pow.Tensor_Scalar)) is None:
            h, h_is_output = viewed, False  # the residual stream continues; the norm reads a view of it
    h, _ = _through_views(h)
    up = _next(h, (CONVERT,)) or h
    pow_ = _next(up, (aten.pow.Tensor_Scalar,))
    mean = pow_ and _next(pow_, (aten.mean.dim,))
    eps_add = mean and _next(mean, (aten.add.Tensor, aten.add.Scalar))
    rsqrt = eps_add and _next(eps_add, (aten.rsqrt.default,))
    if rsqrt is None:
        return None
    normed = _next(rsqrt, (aten.mul.Tensor,))
    inner = {pow_, mean, eps_add, rsqrt, normed}
    chain = [("pow", pow_, 1), ("mean", mean, 1), ("the eps add", eps_add, 1), ("rsqrt", rsqrt, 1),
             ("x * rsqrt", normed, 1)]
    if up is not h:
        chain.insert(0, ("the fp32 upcast", up, 2))
    if not h_is_output:
        chain.insert(0, ("the norm's input", h, 1 if up is not h else 2))
    for label, node, users in chain:
        if node is not None and len(node.users) > users:
            others = [u for u in node.users if u not in inner]
            if any(u.op == "output" for u in others):
                return f"{label} has other users (training graph: saved for backward)"
            return f"{label} has other users ({_targets(others)})"
    return ""


def _after_add(add: torch.fx.Node, prefix: str) -> Optional[str]:
    """Why the residual add ``add`` and what follows it do not fuse, or None when they would."""
    blocker = norm_blocker(add, h_is_output=True)
    if blocker is not None:
        return prefix + blocker if blocker else None
    tip, _ = _through_views(add)
    if _layer_norm(tip) or any(_layer_norm(u) for u in add.users if views.is_row_view(u)):
        return f"{prefix}the residual add is followed by a LayerNorm, not an RMSNorm"
    reorder = _reordering(tip)
    if reorder is not None:
        return (f"{prefix}the residual sum goes through {views.op_label(reorder)} before anything else, which "
                f"reorders or mixes rows: arfuse's fused call cannot follow it")
    return f"{prefix}the residual add is not followed by an RMSNorm (it feeds {_targets(add.users)})"


def _is_arfuse(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "arfuse"


def _added_to_a_fused_residual(node: torch.fx.Node) -> bool:
    """Whether the pass added ``node``'s sum (through row views) to the residual of a fused call: the term a
    ``(sum + addend) + residual`` match moved into the residual."""
    tip, _ = _through_views(node)
    for add in (u for u in tip.users if u.target is aten.add.Tensor):
        end, _ = _through_views(add)
        if any(_is_arfuse(u) for u in end.users):
            return True
    return False


def why_left_alone(node: torch.fx.Node) -> str:
    """Why the pass left the collective ``node`` alone (read off the graph after the pass)."""
    name = op_name(node)
    if node.target is not ALL_REDUCE:
        return f"{_SHORT.get(name, name)}: not an allreduce"
    if node.args[1] != "sum":
        return f"all_reduce with reduce op {node.args[1]!r}: only sums fuse"
    x = val(node.args[0])
    if x is not None and x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype_name(x.dtype)}: arfuse fuses float32/bfloat16/float16"
    waits = [u for u in node.users if u.target is WAIT]
    if len(waits) != 1 or len(node.users) != 1:
        return "its result is not awaited exactly once"
    prefix = "embedding all_reduce: " if from_embedding(node) else ""
    s = waits[0]
    if any(u.target is aten.copy_.default for u in s.users):
        return (f"{prefix}in-place all_reduce of a graph input: the sum is also copied back into the input, and "
                f"the fused call does not return the plain sum")
    if _added_to_a_fused_residual(s):
        return (f"{prefix}its sum is added to the residual of an arfuse fused call (the term added to another "
                f"allreduce's sum); a plain all_reduce, which arfuse fuses on CUDA only")
    tip, chain = _through_views(s)
    if x is not None and chain:
        bad = views.why_not_rows(chain, x.shape[-1])
        if bad is not None:
            return prefix + bad
    users = list(tip.users)
    branches = [tip] + [u for u in users if u.target is aten.mul.Tensor and not isinstance(u.args[1], torch.fx.Node)]
    adds = [u for b in branches for u in b.users if u.target is aten.add.Tensor]
    if adds:
        why = _after_add(adds[0], prefix)
        if why is not None:
            return why
        if len(users) > 1:
            return f"{prefix}the sum has users besides the residual add ({_targets(users)})"
        return f"{prefix}residual add + RMSNorm in a spelling no arfuse pattern matches"
    if _layer_norm(tip):
        return f"{prefix}no residual add follows; the sum feeds a LayerNorm, not an RMSNorm"
    blocker = norm_blocker(tip, h_is_output=False)
    if blocker is not None:
        if blocker.startswith("the norm's input"):
            return (f"{prefix}no residual add follows, and the sum is also used beyond the RMSNorm (e.g. as the "
                    f"residual stream), which rmsnorm does not return")
        return f"{prefix}no residual add follows; {blocker}" if blocker else \
            f"{prefix}RMSNorm in a spelling no arfuse pattern matches"
    reorder = _reordering(tip)
    if reorder is not None:
        return (f"{prefix}the sum goes through {views.op_label(reorder)}, which reorders or mixes rows, before "
                f"anything else: arfuse's fused call cannot follow it")
    return f"{prefix}no residual add or RMSNorm follows (the sum feeds {_targets(users)})"
