"""Mistakes at construction are caught at construction, naming the argument: the device, a norm module that does
not match its fusion object, a strict backend that can never run here, and a functional call's ``x``."""
from __future__ import annotations

import inspect

import pytest
import torch

import arfuse

H = 64


@pytest.fixture
def fusion():
    with arfuse.AllReduceFusion(max_tokens=8, hidden_size=H, dtype=torch.float32, device="cpu") as f:
        yield f


def _build(**kwargs):
    args = dict(max_tokens=8, hidden_size=H, dtype=torch.float32, device="cpu")
    args.update(kwargs)
    return arfuse.AllReduceFusion(**args)


@pytest.mark.parametrize("device,error,message", [
    ("gpu", ValueError, "AllReduceFusion: device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("meta", ValueError, "AllReduceFusion: device must be a cpu or cuda device, got meta"),
    (1.5, TypeError, "AllReduceFusion: device must be a str, int or torch.device, got float"),
    (True, TypeError, "AllReduceFusion: device must be a str, int or torch.device, got bool"),
])
def test_a_device_that_is_not_one_names_device(device, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        _build(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1), 0])
def test_cuda_without_cuda_names_device(device):
    with pytest.raises(ValueError, match=r"AllReduceFusion: device cuda(:\d)? cannot be used: "):
        _build(device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_visible_devices_names_device():
    with pytest.raises(ValueError, match="AllReduceFusion: device cuda:.* does not exist"):
        _build(device=f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("backend", ["nccl", "triton_symm", "triton_symm/lamport", "flashinfer"])
def test_strict_with_a_backend_that_cannot_run_here_fails_at_construction(backend):
    if torch.cuda.is_available():
        pytest.skip("on CUDA these backends may run")
    with pytest.raises(arfuse.FallbackError, match=f"backend '{backend.split('/')[0]}' cannot run"):
        _build(backend=backend, strict=True)
    with _build(backend=backend) as lenient:  # not strict: it falls back, as documented
        assert lenient.plan("residual_rmsnorm", 4).fallback


def test_strict_with_a_backend_that_runs_constructs():
    with _build(backend="torch_ref", strict=True) as f:
        assert not f.plan("residual_rmsnorm", 4).fallback


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((H // 2,), {}, ValueError, "FusedAddRMSNorm: hidden_size must equal the fusion object's hidden_size=64, got 32"),
    ((H, 0.0), {}, ValueError, "FusedAddRMSNorm: eps must be finite and > 0"),
    ((H, -1e-6), {}, ValueError, "FusedAddRMSNorm: eps must be finite and > 0"),
    ((H, "1e-6"), {}, TypeError, "FusedAddRMSNorm: eps must be a float"),
    ((H,), {"dtype": torch.bfloat16}, TypeError, "FusedAddRMSNorm: dtype must be the fusion object's dtype float32"),
    ((H,), {"device": "meta"}, ValueError, "FusedAddRMSNorm: device must be the fusion object's device cpu"),
    ((H,), {"inplace_residual": 1}, TypeError, "FusedAddRMSNorm: inplace_residual must be a bool"),
    ((True,), {}, TypeError, "FusedAddRMSNorm: hidden_size must be an int"),
])
def test_norm_module_checks_its_arguments_against_the_fusion_object(fusion, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        arfuse.FusedAddRMSNorm(*args, fusion=fusion, **kwargs)


def test_norm_module_needs_its_fusion_object_as_its_signature_says(fusion):
    parameter = inspect.signature(arfuse.FusedAddRMSNorm).parameters["fusion"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty
    with pytest.raises(TypeError, match="fusion"):
        arfuse.FusedAddRMSNorm(H)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="FusedAddRMSNorm: fusion must be an AllReduceFusion, got NoneType"):
        arfuse.FusedAddRMSNorm(H, fusion=None)  # type: ignore[arg-type]
    norm = arfuse.FusedAddRMSNorm(H, 1e-5, fusion=fusion, dtype=torch.float32, device="cpu")
    assert norm.weight.dtype == torch.float32 and norm.eps == 1e-5


@pytest.mark.parametrize("op", ["all_reduce", "rmsnorm", "residual_rmsnorm"])
@pytest.mark.parametrize("x,error,message", [
    (torch.ones(2, H, dtype=torch.int64), TypeError, "x must have dtype float32, bfloat16 or float16, got int64"),
    (torch.ones(2, H, dtype=torch.float64), TypeError, "x must have dtype float32, bfloat16 or float16, got float64"),
    (torch.ones(H), ValueError, r"x must be 2-D \(tokens, hidden\), got 1-D"),
    (torch.ones(2, 0), ValueError, "x must have a hidden size > 0"),
    ([[1.0]], TypeError, "x must be a torch.Tensor, got list"),
])
def test_functional_forms_blame_their_own_x(op, x, error, message):
    weight = torch.ones(H)
    call = {"all_reduce": lambda: arfuse.all_reduce(x), "rmsnorm": lambda: arfuse.rmsnorm(x, weight),
            "residual_rmsnorm": lambda: arfuse.residual_rmsnorm(x, x, weight)}[op]
    with pytest.raises(error, match=f"^{op}: {message}"):
        call()


def test_functional_backend_must_be_a_str():
    with pytest.raises(TypeError, match="^all_reduce: backend must be a str, got int"):
        arfuse.all_reduce(torch.ones(2, H), backend=3)
