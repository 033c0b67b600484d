"""Bad-input fuzzing: property-based calls of every op with shapes, dtypes, strides, devices, eps, FP8 scales,
caller outputs (wrong, overlapping) and in-place mode drawn at random (hypothesis, reproducible).

The property: a call either returns the float64 reference's answer (``arfuse.verify`` tolerance, outputs poisoned
with NaN first, inputs untouched) or raises ValueError/TypeError starting with the op's name and naming a bad
argument, before writing anything - never another exception, a wrong answer or a hang. Which of the two is
decided here independently, by :func:`violations` (the documented argument contract re-stated on the generated
tensors), so a wrongly accepted or wrongly refused call fails too.

Most draws break at most two arguments (a fully random draw would almost never be valid). World size 1 runs
through ``AllReduceFusion(device="cpu")`` with hypothesis; a fixed list of generated cases then runs on 2 gloo
ranks, where valid calls are collective and outputs must also be bitwise identical across ranks. The number of
cases is printed and, with ``ARFUSE_RESULTS_DIR`` set, written to ``fuzz_summary.json``.
"""
from __future__ import annotations

import collections
import dataclasses
import fractions
import math
import numbers
import random
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import arfuse
from arfuse.core.types import FP8_DTYPE, FP8_MAX
from arfuse.testing import save_figures
from arfuse.verify import TOLERANCE, digest, poison, rel_err
from tests._ranks import launch

H, MAX = 32, 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPS = ("residual_rmsnorm", "residual_rmsnorm_fp8", "rmsnorm", "all_reduce")
USES = {  # the arguments each op takes besides x
    "residual_rmsnorm": ("residual", "weight", "eps", "out", "residual_out", "inplace"),
    "residual_rmsnorm_fp8": ("residual", "weight", "eps", "scale", "out", "residual_out", "inplace"),
    "rmsnorm": ("weight", "eps", "out"),
    "all_reduce": ("out",),
}
SAME = "same"  # "the fusion object's dtype" (or FP8 for the FP8 op's output)

# Per field: options that keep the call valid, and options that may break it (the contract decides which do).
GOOD = {
    "x_shape": ("2d",), "x_dtype": (SAME,), "x_layout": ("contiguous", "offset"), "x_device": ("cpu",),
    "residual": ("fresh", "alias_x"), "residual_dtype": (SAME,), "residual_layout": ("contiguous", "offset"),
    "residual_device": ("cpu",),
    "weight": ("fresh", "x_row"), "weight_dtype": (SAME,), "weight_layout": ("contiguous", "offset"),
    "weight_device": ("cpu",),
    "eps": (1e-6, 1e-5, 0.25, 1, np.float64(1e-6), fractions.Fraction(1, 10 ** 6), 1e-30),
    "scale": (0.05, 1.0, 3, np.float32(0.5), "tensor[1]", "tensor[]", "tensor[1,1]"),
    "out": ("none", "fresh", "offset"), "residual_out": ("none", "fresh", "offset"),
    "inplace": (False, True),
}
BAD = {
    "x_shape": ("1d", "3d", "wrong_hidden", "list"),
    "x_dtype": (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.int64, FP8_DTYPE),
    "x_layout": ("transposed", "strided"), "x_device": ("meta",),
    "residual": ("wrong_shape", "list"),
    "residual_dtype": (torch.float32, torch.bfloat16, torch.float64, torch.int64),
    "residual_layout": ("transposed", "strided"), "residual_device": ("meta",),
    "weight": ("wrong_size", "scalar", "list"), "weight_dtype": (torch.float32, torch.float16, torch.int32),
    "weight_layout": ("strided",), "weight_device": ("meta",),
    "eps": (0.0, -1e-6, math.inf, -math.inf, math.nan, True, False, "1e-6", None, torch.tensor(1e-6)),
    "scale": (0.0, -1.0, math.inf, math.nan, True, "0.05", None, "tensor_fp16", "tensor[2]", "tensor_meta",
              "tensor_fp64"),
    "out": ("wrong_shape", "wrong_dtype", "strided", "meta", "alias_x", "partial_x", "bytes_of_x",
            "alias_residual", "weight_view"),
    "residual_out": ("wrong_shape", "wrong_dtype", "strided", "meta", "alias_x", "partial_x", "bytes_of_x",
                     "alias_residual", "alias_out", "weight_view"),
    "inplace": (1, 0, None, "yes"),
}
FIELDS = tuple(GOOD)
SCALE_VALUE = 0.05  # every tensor scale holds this (a tensor's value is not checked: that needs a sync)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One generated call: the op, the fusion object's dtype, the token count and one option per field."""

    op: str
    dtype: torch.dtype
    tokens: int
    choice: Tuple[Tuple[str, object], ...]
    seed: int

    def __getitem__(self, field: str):
        return dict(self.choice)[field]

    def __str__(self) -> str:
        shown = {f: v for f, v in self.choice if f in breakable(self.op) and v is not GOOD[f][0]}
        return f"{self.op} {self.dtype} tokens={self.tokens} seed={self.seed} {shown}"


def spec_from(pick: Callable[[Sequence], object], faulty: Sequence[str], op: str, dtype: torch.dtype, tokens: int,
              seed: int) -> Spec:
    """A spec whose ``faulty`` fields take a possibly-bad option, the others a good one (``pick`` chooses)."""
    choice = tuple((f, pick(BAD[f] if f in faulty else GOOD[f])) for f in FIELDS)
    return Spec(op, dtype, tokens, choice, seed)


def breakable(op: str) -> Tuple[str, ...]:
    """The fields that matter to ``op`` (breaking another one would change nothing)."""
    return tuple(f for f in FIELDS if f.startswith("x_") or f.split("_")[0] in USES[op] or f in USES[op])


@st.composite
def specs(draw) -> Spec:
    op = draw(st.sampled_from(OPS))
    faulty = draw(st.sets(st.sampled_from(breakable(op)), max_size=2))
    return spec_from(lambda options: draw(st.sampled_from(options)), sorted(faulty), op,
                     draw(st.sampled_from(DTYPES)), draw(st.integers(0, MAX + 1)), draw(st.integers(0, 2 ** 16)))


def fixed_specs(n: int, seed: int) -> List[Spec]:
    """``n`` specs from a seeded generator (for the multi-rank run, where hypothesis cannot drive the ranks)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(OPS)
        faulty = rng.sample(breakable(op), rng.choice((0, 0, 1, 2)))
        out.append(spec_from(rng.choice, faulty, op, rng.choice(DTYPES), rng.randint(0, MAX + 1),
                             rng.randrange(2 ** 16)))
    return out


def corner(op: str, dtype=torch.bfloat16, tokens: int = 4, **fields) -> Spec:
    """A hand-picked spec: good options (the first of each) except ``fields``."""
    return Spec(op, dtype, tokens, tuple((f, fields.get(f, GOOD[f][0])) for f in FIELDS), seed=7)


CORNERS = (  # always run, beside the drawn ones: the rare paths a few hundred draws may miss
    corner("residual_rmsnorm_fp8", out="bytes_of_x"),  # an FP8 output in x's bytes: named quant_out
    corner("residual_rmsnorm_fp8", torch.float32, residual_out="bytes_of_x"),
    corner("residual_rmsnorm", inplace=True, out="alias_residual"),  # in place: norm_out is the residual
    corner("residual_rmsnorm", inplace=True, residual="alias_x"),  # in place on x itself
    corner("residual_rmsnorm", inplace=True),  # the engines' mode, valid
    corner("residual_rmsnorm", x_layout="offset", out="partial_x"),  # rows shifted by one: partial overlap
    corner("residual_rmsnorm", tokens=1, x_layout="offset", out="partial_x"),  # adjacent, not overlapping
    corner("rmsnorm", tokens=1, x_layout="transposed"),  # one row: a transpose is contiguous, so valid
    corner("residual_rmsnorm", tokens=0, out="alias_x"),  # empty tensors overlap nothing
    corner("residual_rmsnorm", tokens=MAX + 1),
    corner("residual_rmsnorm", out="weight_view"),  # weight lives inside norm_out
    corner("residual_rmsnorm_fp8", scale="tensor[]"),
    corner("residual_rmsnorm_fp8", scale="tensor_meta"),
    corner("all_reduce", torch.float16, out="partial_x", x_layout="offset"),
)


# -- building the call ---------------------------------------------------------------------------------------------

def _dtype(option, dtype: torch.dtype) -> torch.dtype:
    return dtype if option == SAME else option


def _random(shape, dtype, gen) -> torch.Tensor:
    t = torch.randn(shape, generator=gen)
    return t.to(dtype) if dtype.is_floating_point else (t * 4).to(dtype)


def _laid_out(shape, dtype, layout, gen) -> Tuple[torch.Tensor, torch.Tensor]:
    """A tensor of ``shape`` in ``layout`` and the allocation it lives in (its base)."""
    if layout == "offset" and len(shape) >= 1:  # contiguous, but not at the start of its storage
        base = _random((shape[0] + 2,) + tuple(shape[1:]), dtype, gen)
        return base[1:shape[0] + 1], base
    if layout == "transposed" and len(shape) >= 2:
        base = _random(tuple(reversed(shape)), dtype, gen)
        return base.permute(*reversed(range(len(shape)))), base
    if layout == "strided" and len(shape) >= 1:
        base = _random(tuple(shape[:-1]) + (2 * shape[-1],), dtype, gen)
        return base[..., ::2], base
    t = _random(shape, dtype, gen)
    return t, t


def _on(t, device: str):
    return t.to(device) if isinstance(t, torch.Tensor) and device != "cpu" else t


def _x_shape(spec: Spec) -> tuple:
    n = spec.tokens
    return {"2d": (n, H), "list": (n, H), "1d": (H,), "3d": (1, n, H), "wrong_hidden": (n, H + 8)}[spec["x_shape"]]


@dataclasses.dataclass
class Call:
    """The materialized arguments of one spec on one rank (None: not passed)."""

    x: object
    x_base: Optional[torch.Tensor]
    residual: object = None
    weight: object = None
    eps: object = None
    scale: object = None
    out: Optional[torch.Tensor] = None
    residual_out: Optional[torch.Tensor] = None
    inplace: object = False


def _gen(spec: Spec, role: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed * 1009 + role * 31 + rank)


def materialize(spec: Spec, rank: int = 0) -> Call:
    """Build the arguments; only ``x`` (and what aliases it) depends on the rank."""
    uses, d = USES[spec.op], spec.dtype
    shape = _x_shape(spec)
    x, x_base = _laid_out(shape, _dtype(spec["x_dtype"], d), spec["x_layout"], _gen(spec, 1, rank))
    call = Call(x=x, x_base=x_base)
    if "residual" in uses:
        call.residual = _residual(spec, x, shape)
    if "weight" in uses:
        call.weight = _weight(spec, x)
    if "eps" in uses:
        call.eps = spec["eps"]
    if "scale" in uses:
        call.scale = _scale(spec["scale"])
    if "inplace" in uses:
        call.inplace = spec["inplace"]
    out_dtype = FP8_DTYPE if spec.op == "residual_rmsnorm_fp8" else d
    call.out = _output(spec["out"], shape, out_dtype, call, d)
    if "residual_out" in uses:
        call.residual_out = _output(spec["residual_out"], shape, d, call, d)
    call.x = _on(x, spec["x_device"]) if spec["x_shape"] != "list" else x.tolist()
    return call


def _residual(spec: Spec, x: torch.Tensor, shape: tuple):
    kind = spec["residual"]
    if kind == "alias_x":
        return x
    if kind == "wrong_shape":
        shape = shape[:-1] + (shape[-1] + 1,)
    t, _ = _laid_out(shape, _dtype(spec["residual_dtype"], spec.dtype), spec["residual_layout"], _gen(spec, 2))
    return t.tolist() if kind == "list" else _on(t, spec["residual_device"])


def _weight(spec: Spec, x: torch.Tensor):
    kind = spec["weight"]
    if kind == "x_row" and x.dim() == 2 and x.shape[0] >= 1 and x.shape[1] == H:
        return x[0]
    size = {"wrong_size": (H + 1,), "scalar": ()}.get(kind, (H,))
    t, _ = _laid_out(size, _dtype(spec["weight_dtype"], spec.dtype), spec["weight_layout"], _gen(spec, 3))
    t = 1.0 + 0.1 * t if t.dtype.is_floating_point else t
    return t.tolist() if kind == "list" else _on(t, spec["weight_device"])


def _scale(option):
    tensors = {"tensor[1]": ((1,), torch.float32), "tensor[]": ((), torch.float32),
               "tensor[1,1]": ((1, 1), torch.float32), "tensor_fp16": ((1,), torch.float16),
               "tensor[2]": ((2,), torch.float32), "tensor_meta": ((1,), torch.float32),
               "tensor_fp64": ((1,), torch.float64)}
    if not isinstance(option, str) or option not in tensors:
        return option
    shape, dtype = tensors[option]
    t = torch.full(shape, SCALE_VALUE, dtype=dtype)
    return t.to("meta") if option == "tensor_meta" else t


def _output(kind: str, shape: tuple, dtype: torch.dtype, call: Call, fusion_dtype: torch.dtype):
    """A caller-provided output (poisoned with NaN where it is a fresh float tensor), or None."""
    if kind == "none":
        return None
    if kind == "alias_x":
        return call.x
    if kind == "partial_x" and call.x_base is not call.x and call.x_base.shape[0] >= 2 and call.x.dim() == 2:
        return call.x_base[:call.x.shape[0]]  # the rows of x's allocation shifted by one: a partial overlap
    if kind == "bytes_of_x" and call.x.is_contiguous():
        need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if call.x.numel() * call.x.element_size() >= need:  # x's own bytes, reinterpreted as the output
            return call.x.reshape(-1).view(torch.uint8)[:need].view(dtype).view(shape)
    if kind == "alias_residual":
        return call.residual if isinstance(call.residual, torch.Tensor) else None
    if kind == "alias_out":
        return call.out
    if kind == "weight_view" and isinstance(call.weight, torch.Tensor) and call.weight.dim() == 1:
        base = torch.empty(shape, dtype=dtype)
        call.weight = base.view(-1)[:call.weight.numel()]
        if call.weight.numel():
            call.weight.fill_(1.0)
        return base
    if kind == "wrong_shape":
        shape = (shape[0] + 1,) + tuple(shape[1:])
    if kind == "wrong_dtype":
        dtype = fusion_dtype if dtype == FP8_DTYPE else torch.float64
    layout = {"offset": "offset", "strided": "strided"}.get(kind, "contiguous")
    t, _ = _laid_out(shape, dtype, layout, torch.Generator().manual_seed(0))
    poison(t)
    return t.to("meta") if kind == "meta" else t


# -- the contract, re-stated ---------------------------------------------------------------------------------------

def _span(t: torch.Tensor) -> Tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + t.numel() * t.element_size()


def _overlap(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.numel() == 0 or b.numel() == 0:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu":
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _tensor_problems(t, name: str, dtype: torch.dtype, shape: Optional[tuple]) -> List[str]:
    if not isinstance(t, torch.Tensor):
        return [name]
    bad = t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()
    return [name] if bad or (shape is not None and tuple(t.shape) != tuple(shape)) else []


def _real_positive(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
            and float(value) > 0)


def violations(spec: Spec, call: Call) -> List[str]:
    """The arguments of ``call`` that break the documented contract (empty: the call is valid)."""
    op, d, uses = spec.op, spec.dtype, USES[spec.op]
    x = call.x
    bad = []
    x_ok = (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == d and x.device.type == "cpu"
            and x.shape[1] == H and x.shape[0] <= MAX and x.is_contiguous())
    if not x_ok:
        bad.append("x")
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
    if "residual" in uses:
        bad += _tensor_problems(call.residual, "residual", d, shape)
    if "weight" in uses:
        bad += _tensor_problems(call.weight, "weight", d, (H,))
    if "eps" in uses and not _real_positive(call.eps):
        bad.append("eps")
    if "scale" in uses:
        s = call.scale
        ok = (s.numel() == 1 and s.dtype == torch.float32 and s.device.type == "cpu") if isinstance(s, torch.Tensor) \
            else _real_positive(s)
        if not ok:
            bad.append("scale")
    inplace = call.inplace
    if not isinstance(inplace, bool):
        bad.append("inplace")
    out_name = {"residual_rmsnorm": "norm_out", "residual_rmsnorm_fp8": "quant_out"}.get(op, "out")
    outputs: Dict[str, torch.Tensor] = {}
    if call.out is not None:
        bad += _tensor_problems(call.out, out_name, FP8_DTYPE if op == "residual_rmsnorm_fp8" else d, shape)
        outputs[out_name] = call.out
    if call.residual_out is not None:
        if inplace is True:
            bad.append("residual_out")  # inplace=True and residual_out together
        bad += _tensor_problems(call.residual_out, "residual_out", d, shape)
        outputs["residual_out"] = call.residual_out
    elif inplace is True:
        outputs["residual_out"] = call.residual
    inputs = {"x": x, "residual": call.residual, "weight": call.weight}
    names = list(outputs)
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            if _overlap(outputs[name], outputs[other]):
                bad.append(name)
        for iname, t in inputs.items():
            if _overlap(outputs[name], t) and not (inplace is True and (name, iname) == ("residual_out", "residual")):
                bad.append(name)
    return sorted(set(bad))


# -- running a call ------------------------------------------------------------------------------------------------

def invoke(fusion: arfuse.AllReduceFusion, spec: Spec, call: Call):
    """Make the call; returns ``(out, residual_out)`` (residual_out None for ops without one)."""
    kw = {}
    if spec.op == "all_reduce":
        return fusion.all_reduce(call.x, **({"out": call.out} if call.out is not None else {})), None
    if spec.op == "rmsnorm":
        kw = {"out": call.out} if call.out is not None else {}
        return fusion.rmsnorm(call.x, call.weight, call.eps, **kw), None
    if call.residual_out is not None:
        kw["residual_out"] = call.residual_out
    if spec.op == "residual_rmsnorm":
        if call.out is not None:
            kw["norm_out"] = call.out
        return fusion.residual_rmsnorm(call.x, call.residual, call.weight, call.eps, inplace=call.inplace, **kw)
    if call.out is not None:
        kw["quant_out"] = call.out
    return fusion.residual_rmsnorm_fp8(call.x, call.residual, call.weight, call.scale, call.eps,
                                       inplace=call.inplace, **kw)


def _bits(t) -> Optional[bytes]:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def reference(spec: Spec, call: Call, xs_sum: torch.Tensor, residual_in: Optional[torch.Tensor]):
    """(out, residual_out) in float64 from the actual inputs (``xs_sum``: the sum of every rank's x)."""
    s = xs_sum
    if spec.op == "all_reduce":
        return s, None
    res = None
    if residual_in is not None:
        s = s + residual_in.double()
        res = s
    eps = float(call.eps)
    norm = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * call.weight.double()
    if spec.op == "residual_rmsnorm_fp8":
        scale = float(call.scale.reshape(-1)[0]) if isinstance(call.scale, torch.Tensor) else float(call.scale)
        norm = (norm / scale).clamp(-FP8_MAX, FP8_MAX)
    return norm, res


def check(fusion, spec: Spec, call: Call, xs_sum_fn: Callable[[], torch.Tensor]) -> Tuple[str, Optional[str]]:
    """Run one call and judge it; returns ``(outcome, digest)``. Raises AssertionError on any broken property."""
    bad = violations(spec, call)
    watched = {"x": call.x, "residual": call.residual, "weight": call.weight, "out": call.out,
               "residual_out": call.residual_out}
    before = {k: _bits(t) for k, t in watched.items()}
    residual_in = call.residual.clone() if spec.op.startswith("residual") and not bad else None
    try:
        out, res_out = invoke(fusion, spec, call)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert bad, f"{spec}: a valid call raised {type(e).__name__}: {msg}"
        assert msg.startswith(f"{spec.op}:"), f"{spec}: message does not start with the op name: {msg!r}"
        assert any(re.search(rf"\b{re.escape(name)}\b", msg) for name in bad), \
            f"{spec}: message {msg!r} names none of the bad arguments {bad}"
        changed = [k for k, b in before.items() if b is not None and _bits(watched[k]) != b]
        assert not changed, f"{spec}: a refused call modified {changed}"
        return type(e).__name__, None
    assert not bad, f"{spec}: accepted a call that breaks the contract on {bad}"
    unchanged = ["x", "weight"] + ([] if call.inplace or spec.op in ("rmsnorm", "all_reduce") else ["residual"])
    changed = [k for k in unchanged if _bits(watched[k]) != before[k]]
    assert not changed, f"{spec}: modified its input {changed}"
    if call.out is not None:
        assert out is call.out, f"{spec}: did not return the caller's output tensor"
    if call.residual_out is not None or call.inplace:
        assert res_out is (call.residual_out if call.residual_out is not None else call.residual), \
            f"{spec}: did not return the caller's residual tensor"
    ref, ref_res = reference(spec, call, xs_sum_fn(), residual_in)
    assert tuple(out.shape) == tuple(call.x.shape), f"{spec}: output shape {tuple(out.shape)}"
    tol = TOLERANCE[out.dtype]
    err = rel_err(out.float(), ref)
    assert err <= tol, f"{spec}: output error {err:.3g} > {tol:g} (inf: NaN left in the output)"
    if ref_res is not None:
        err_res = rel_err(res_out, ref_res)
        assert err_res <= TOLERANCE[spec.dtype], f"{spec}: residual error {err_res:.3g}"
    return "returned", digest(*(t for t in (out, res_out) if t is not None))


# -- world size 1, driven by hypothesis ----------------------------------------------------------------------------

COUNTS: Dict[str, collections.Counter] = {"world_size_1": collections.Counter(), "world_size_2": collections.Counter()}


def _write_summary(figure) -> None:
    """Report the cases run so far (in the run's "arfuse figures" section) and write them to fuzz_summary.json."""
    total = {k: sum(c.values()) for k, c in COUNTS.items()}
    figures = dict(cases=sum(total.values()), replays=0, faults_injected=0, faults_survived=0, hangs=0,
                   wrong_results=0, worst_error=None)
    save_figures("fuzz", figures, {k: dict(c) for k, c in COUNTS.items()}, filename="fuzz_summary.json")
    figure("fuzz", f"{sum(total.values())} calls checked {total}; outcomes "
           f"{ {k: dict(sorted(c.items())) for k, c in COUNTS.items()} }")


def _with_corners(test):
    for spec in CORNERS:
        test = example(spec=spec)(test)
    return test


@pytest.fixture(scope="module")
def fusions():
    objs = {d: arfuse.AllReduceFusion(max_tokens=MAX, hidden_size=H, dtype=d, device="cpu") for d in DTYPES}
    yield objs
    for f in objs.values():
        f.close()


@pytest.mark.timeout(300)
@settings(max_examples=450, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=specs())
@_with_corners
def test_every_call_returns_the_reference_or_raises_a_named_value_or_type_error(fusions, spec):
    call = materialize(spec)
    outcome, _ = check(fusions[spec.dtype], spec, call, lambda: call.x.double())
    COUNTS["world_size_1"][f"{spec.op} {outcome}"] += 1


def test_fuzzing_reached_both_outcomes_for_every_op(figure):
    """Runs after the property test: the draws exercised valid and invalid calls of every op."""
    seen = COUNTS["world_size_1"]
    if not seen:
        pytest.skip("the property test did not run in this session")
    for op in OPS:
        assert seen[f"{op} returned"] > 10, (op, dict(seen))
        assert seen[f"{op} ValueError"] + seen[f"{op} TypeError"] > 10, (op, dict(seen))
    _write_summary(figure)


# -- 2 gloo ranks, a fixed list of generated cases -----------------------------------------------------------------

RANK_SPECS = 120


def _on_ranks(rank, world, specs_):
    fusions_ = {d: arfuse.AllReduceFusion(max_tokens=MAX, hidden_size=H, dtype=d, device="cpu") for d in DTYPES}
    results = []
    for spec in specs_:
        call = materialize(spec, rank)

        def xs_sum(spec=spec):
            return sum(materialize(spec, r).x.double() for r in range(world))

        try:
            outcome, dig = check(fusions_[spec.dtype], spec, call, xs_sum)
        except AssertionError as e:
            outcome, dig = f"FAILED: {e}", None
        results.append((outcome, dig))
    for f in fusions_.values():
        f.close()
    return results


@pytest.mark.timeout(180)
def test_generated_cases_on_two_ranks_agree_and_match_the_reference(figure):
    specs_ = fixed_specs(RANK_SPECS, seed=2026)
    per_rank = launch(_on_ranks, 2, specs_, timeout_s=120)
    failures = [f"rank {r}: {o}" for r, res in enumerate(per_rank) for o, _ in res if o.startswith("FAILED")]
    assert not failures, "\n".join(failures[:10])
    for spec, (a, b) in zip(specs_, zip(*per_rank)):
        assert a[0] == b[0], f"{spec}: ranks disagree: {a[0]} vs {b[0]}"
        # residual or weight taken from x differ per rank, so only then may the outputs differ
        if a[1] is not None and spec["residual"] != "alias_x" and spec["weight"] != "x_row":
            assert a[1] == b[1], f"{spec}: outputs differ across ranks"
    for outcome, _ in per_rank[0]:
        COUNTS["world_size_2"][outcome] += 1
    assert COUNTS["world_size_2"]["returned"] >= RANK_SPECS // 4, dict(COUNTS["world_size_2"])
    _write_summary(figure)
