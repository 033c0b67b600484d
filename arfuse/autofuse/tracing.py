"""Search patterns traced from torch functions, as Inductor's own fusion passes build theirs: the function runs
through AOT autograd with Inductor's decomposition table (functionalized, as the graphs the pass sees), then the
post-grad clean-ups that run before the pass, and the graph becomes a pattern expression.

:func:`to_pattern` is the conversion: placeholders become the expressions the caller gives (a keyword argument,
or a sub-pattern built for the number of users the placeholder has), sentinel constants
(``spellings.SENTINELS``) become keyword arguments, the dtypes of casts become ``up_dtype`` (float32 in a bf16/fp16
trace), ``out_dtype`` (the trace's activation dtype) or ``q_dtype`` (FP8), and the first list of ints (the
reduction dims) becomes ``dims``. Every other constant must match as traced.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, PatternExpr

from arfuse.autofuse.spellings import SENTINELS
from arfuse.core.types import FP8_DTYPE

CONVERT = torch.ops.prims.convert_element_type.default
Input = Union[PatternExpr, Callable[[int], PatternExpr]]


class TraceError(RuntimeError):
    """A traced spelling does not become a usable pattern on this torch (a sentinel vanished, an op is not a
    plain call)."""


@contextlib.contextmanager
def _clean_context():
    """No fake mode, tracing context or Dynamo frame of an ongoing compilation leaks into the trace."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with torch._guards.tracing(None), unset_fake_temporarily(), torch.no_grad():
        yield


@functools.lru_cache(maxsize=None)
def trace(fn: Callable, example: Tuple[Tuple[Tuple[int, ...], torch.dtype], ...]) -> torch.fx.GraphModule:
    """``fn`` traced on CPU tensors of ``example``'s (shape, dtype) as Inductor would hand it to a post-grad pass."""
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape

    captured: Dict[str, torch.fx.GraphModule] = {}

    def capture(gm, _inputs):
        captured["gm"] = gm
        return gm

    with _clean_context():
        args = [torch.zeros(shape, dtype=dtype) for shape, dtype in example]
        aot_function(fn, fw_compiler=capture, decompositions=select_decomp_table())(*args)
    gm = captured["gm"]
    remove_noop_ops(gm.graph)
    gm.graph.eliminate_dead_code()
    view_to_reshape(gm)
    gm.recompile()
    return gm


class _Converter:
    def __init__(self, activation_dtype: torch.dtype):
        self.activation_dtype = activation_dtype
        self.found: set = set()
        self.dims_taken = False

    def dtype(self, dtype: torch.dtype) -> Any:
        if dtype == FP8_DTYPE:
            return KeywordArg("q_dtype")
        if dtype == torch.float32 and self.activation_dtype != torch.float32:
            return KeywordArg("up_dtype")
        if dtype == self.activation_dtype:
            return KeywordArg("out_dtype")
        return dtype

    def constant(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and not self.dims_taken:
                self.dims_taken = True
                self.found.add("dims")
                return KeywordArg("dims")
            return type(value)(self.constant(v) for v in value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value in SENTINELS:
            self.found.add(SENTINELS[value])
            return KeywordArg(SENTINELS[value])
        return value


def to_pattern(gm: torch.fx.GraphModule, inputs: Sequence[Input], activation_dtype: torch.dtype,
               output_users, expected: Sequence[str] = ()) -> PatternExpr:
    """The pattern of ``gm``'s single output. ``inputs``: per placeholder, a pattern expression, or a function of
    the placeholder's user count returning one. ``expected``: the sentinel names the traced function used (each
    must be found, or the trace lost it and :class:`TraceError` says so)."""
    conv = _Converter(activation_dtype)
    env: Dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise TraceError(f"traced graph has {len(placeholders)} inputs, {len(inputs)} given")
    for node, given in zip(placeholders, inputs):
        env[node] = given if isinstance(given, PatternExpr) else given(len(node.users))
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    results = output.args[0]
    results = results if isinstance(results, (list, tuple)) else (results,)
    if len(results) != 1:
        raise TraceError(f"traced graph has {len(results)} outputs, one expected")
    for node in gm.graph.nodes:
        if node.op != "call_function":
            if node.op not in ("placeholder", "output"):
                raise TraceError(f"traced graph holds a {node.op} node ({node.target})")
            continue

        def arg(a, node=node):
            if isinstance(a, torch.fx.Node):
                return env[a]
            if node.target is CONVERT and isinstance(a, torch.dtype):
                return conv.dtype(a)
            return conv.constant(a)

        args = [arg(a) for a in node.args]
        kwargs = {k: arg(v) for k, v in node.kwargs.items()}
        users = output_users if node is results[0] else len(node.users)
        env[node] = CallFunction(node.target, *args, _users=users, **kwargs)
    missing = [name for name in expected if name not in conv.found]
    if missing:
        raise TraceError(f"the traced graph lost {', '.join(missing)} (this torch folds or rewrites it)")
    return env[results[0]]


def traced_pattern(fn: Callable, example: Sequence[Tuple[Tuple[int, ...], torch.dtype]], inputs: List[Input],
                   activation_dtype: torch.dtype, output_users, expected: Sequence[str] = ()) -> PatternExpr:
    """:func:`trace` then :func:`to_pattern`."""
    return to_pattern(trace(fn, tuple(example)), inputs, activation_dtype, output_users, expected)
