"""torch.compile(fullgraph=True) of a small model calling the fused ops, on CPU with the reference backend: no
graph breaks, the same result as eager, the in-place residual visible to the caller, and the op really running
(counted) inside the compiled graph. Plus ``torch.library.opcheck`` of the op's registration."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import arfuse
from arfuse import functional as F

HIDDEN = 32


class TinyBlock(nn.Module):
    """Linear -> fused norm (residual) -> linear -> fused norm (residual in place) -> fused ops on the object."""

    def __init__(self, fusion: arfuse.AllReduceFusion):
        super().__init__()
        torch.manual_seed(0)
        self.fusion = fusion
        self.up, self.down = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.norm1 = arfuse.FusedAddRMSNorm(HIDDEN, fusion=fusion)
        self.norm2 = arfuse.FusedAddRMSNorm(HIDDEN, fusion=fusion, inplace_residual=True)
        with torch.no_grad():
            self.norm1.weight.uniform_(0.5, 1.5)
            self.norm2.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        h, residual = self.norm1(self.up(x), residual)
        h, residual = self.norm2(self.down(h), residual)  # in place into norm1's residual output
        quant, _ = self.fusion.residual_rmsnorm_fp8(h, residual, self.norm1.weight, 0.5, inplace=True)
        return self.fusion.all_reduce(h) + self.norm1(h) + quant.float(), residual


def _inplace_model(fusion, weight):
    def step(x, residual):
        norm, _ = fusion.residual_rmsnorm(x, residual, weight, 1e-6, inplace=True)
        return norm * 2
    return step


@pytest.fixture
def fusion():
    with arfuse.AllReduceFusion(max_tokens=16, hidden_size=HIDDEN, dtype=torch.float32, device="cpu",
                                backend="torch_ref") as f:
        yield f


def test_model_compiles_fullgraph_and_matches_eager(fusion):
    model = TinyBlock(fusion)
    x, residual = torch.randn(5, HIDDEN), torch.randn(5, HIDDEN)
    with torch.no_grad():
        eager_out, eager_res = model(x, residual.clone())
        explained = torch._dynamo.explain(model)(x, residual.clone())
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        before = fusion.stats()["calls"]["torch_ref"]
        out, res = compiled(x, residual.clone())
        assert fusion.stats()["calls"]["torch_ref"] == before + 5  # the op ran inside the graph, 5 times
        out2, _ = compiled(torch.randn(9, HIDDEN), torch.randn(9, HIDDEN))  # another token count
    assert torch.equal(out, eager_out) and torch.equal(res, eager_res)
    assert out2.shape == (9, HIDDEN)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_inplace_residual_updates_the_callers_tensor(fusion, compiler):
    weight = torch.rand(HIDDEN) + 0.5
    step = _inplace_model(fusion, weight)
    x, residual = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    eager_res = residual.clone()
    eager_out = step(x, eager_res)
    torch._dynamo.reset()
    compiled_res = residual.clone()
    out = torch.compile(step, fullgraph=True, backend=compiler)(x, compiled_res)
    assert torch.equal(out, eager_out)
    assert torch.equal(compiled_res, eager_res) and not torch.equal(compiled_res, residual)


def test_op_registration_passes_opcheck(fusion):
    from arfuse.core.math import ue8m0_empty
    from arfuse.core.spec import FusionSpec, Prologue, Quant, ScaleLayout

    x, r, w = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN), torch.rand(HIDDEN)
    op = torch.ops.arfuse.fused_.default
    handle = fusion._handle
    group = FusionSpec(quant=Quant.FP8_PER_TOKEN_GROUP, group_size=8, scale_layout=ScaleLayout.UE8M0,
                       also_norm=True, weight_offset=True)
    moe = FusionSpec(prologue=Prologue.MOE_FINALIZE, shared_expert=True, quant=Quant.FP8_PER_TOKEN,
                     scale_layout=ScaleLayout.FP32)
    experts, idx = torch.randn(6, HIDDEN), torch.tensor([[0, 5], [1, 2], [3, 4]], dtype=torch.int32)
    fp8 = torch.empty(3, HIDDEN, dtype=torch.float8_e4m3fn)
    cases = (
        (x, r, w, None, None, None, None, 1e-6, 0.0, handle, arfuse.Pattern.RESIDUAL_RMSNORM.spec.code,
         torch.empty_like(x), torch.empty_like(x), None, None),
        (x, None, w, None, None, None, None, 1e-6, 0.0, handle, arfuse.Pattern.RESIDUAL_RMSNORM.spec.code,
         torch.empty_like(x), r.clone(), None, None),  # in-place residual: read from and written to residual_out
        (x, None, None, None, None, None, None, 1.0, 0.0, handle, arfuse.Pattern.ALLREDUCE.spec.code,
         torch.empty_like(x), None, None, None),
        (x, r, w, None, None, None, None, 1e-6, 1.0, handle, group.code, fp8.clone(), torch.empty_like(x),
         torch.empty_like(x), ue8m0_empty(3, HIDDEN // 8, "cpu")),
        (experts, r, w, None, idx, torch.rand(3, 2), torch.randn(3, HIDDEN), 1e-6, 0.0, handle, moe.code,
         fp8.clone(), torch.empty_like(x), None, torch.empty(3, 1)),
    )
    for args in cases:
        fp8_output = args[11].dtype == torch.float8_e4m3fn
        # opcheck's schema check multiplies the outputs, which torch cannot do for FP8 tensors on CPU; the
        # mutations it would check are declared once for every spec (the first three cases check them)
        utils = ("test_faketensor", "test_aot_dispatch_dynamic") if fp8_output else \
            ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        result = torch.library.opcheck(op, args, test_utils=utils)
        assert set(result.values()) == {"SUCCESS"}, result


def test_functional_forms_compile_fullgraph_once_their_object_exists():
    """A functional form finds its cached object without the lock (a plain dict read), so a compiled function
    that calls it traces in one graph when the object exists; building one (under the lock) does not trace:
    compile models through AllReduceFusion / FusedAddRMSNorm."""
    def fn(x, r, w):
        norm, res = F.residual_rmsnorm(x, r, w)
        return norm + res

    x, r, w = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN), torch.ones(HIDDEN)
    want = fn(x, r, w)  # the cached object exists before tracing
    torch._dynamo.reset()
    try:
        assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, r, w), want)
    finally:
        F.close_all()


def test_compiled_moe_call_still_rejects_an_index_out_of_range(fusion):
    """While tracing the indices cannot be read, so the op checks them when it runs, before the collective."""
    experts, scales = torch.randn(8, HIDDEN), torch.rand(4, 2)
    residual, weight = torch.randn(4, HIDDEN), torch.ones(HIDDEN)

    def step(idx):
        return fusion.moe_finalize_residual_rmsnorm(experts, idx, scales, residual, weight).norm

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    good = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)
    assert torch.equal(compiled(good), step(good))
    calls = fusion.stats()["calls"]["torch_ref"]
    with pytest.raises(ValueError, match=r"permuted_idx holds 99, outside \[0, 8\)"):
        compiled(torch.tensor([[0, 1], [2, 3], [4, 5], [6, 99]], dtype=torch.int32))
    assert fusion.stats()["calls"]["torch_ref"] == calls  # nothing ran
