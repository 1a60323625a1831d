"""Fused LayerNorm + adaLN modulate: outputs and gradients against float64, Triton under the
interpreter on the CPU (tiny shapes) and compiled on CUDA."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from support.numerics import rel_err  # noqa: E402

from softvq_fast.dispatch import NoBackendError  # noqa: E402
from softvq_fast.ops.layernorm_modulate import BACKENDS, LayerNormModulateInputs, layernorm_modulate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(batch: int, tokens: int, dim: int, dtype: torch.dtype, device: str = DEVICE):
    """x and (shift, scale) as chunks of one adaLN projection, i.e. strided rows as in the blocks."""
    x = torch.randn(batch, tokens, dim, device=device).to(dtype).requires_grad_()
    modulation = (0.5 * torch.randn(batch, 3 * dim, device=device)).to(dtype).requires_grad_()
    return x, modulation


def _forward_backward(x, modulation, backend):
    shift, scale, _ = modulation.chunk(3, dim=1)
    y = layernorm_modulate(x, shift, scale, backend=backend)
    grad = torch.randn_like(y, dtype=torch.float64).to(y.dtype)
    y.backward(grad)
    return y, x.grad, modulation.grad, grad


def _reference(x, modulation, grad):
    x64 = x.detach().double().requires_grad_()
    mod64 = modulation.detach().double().requires_grad_()
    shift, scale, _ = mod64.chunk(3, dim=1)
    mean = x64.mean(-1, keepdim=True)
    var = x64.var(-1, unbiased=False, keepdim=True)
    y64 = (x64 - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    y64.backward(grad.double())
    return y64, x64.grad, mod64.grad


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every fresh float buffer starts as NaN, so an element a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 48), (3, 70, 40)])  # 70 tokens: two backward chunks; D not a power of 2
def test_triton_matches_float64(shape, dtype, poisoned_allocations):
    x, modulation = _inputs(*shape, dtype)
    y, dx, dmod, grad = _forward_backward(x, modulation, "triton")
    y64, dx64, dmod64 = _reference(x, modulation, grad)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and dmod.dtype == dtype
    assert rel_err(y, y64) <= tol
    assert rel_err(dx, dx64) <= tol
    assert rel_err(dmod[:, : 2 * shape[2]], dmod64[:, : 2 * shape[2]]) <= tol
    assert torch.count_nonzero(dmod[:, 2 * shape[2] :]) == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_reference_and_triton_agree_on_contiguous_rows(backend):
    x = torch.randn(2, 3, 24, device=DEVICE)
    shift, scale = torch.randn(2, 24, device=DEVICE), torch.randn(2, 24, device=DEVICE)
    y = layernorm_modulate(x, shift, scale, backend=backend)
    y64 = torch.nn.functional.layer_norm(x.double(), (24,), eps=1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    assert rel_err(y, y64) <= 1e-5


def test_opcheck_triton_custom_op():
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    scale = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    shift = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.softvq_fast.layernorm_modulate_triton.default, (x, scale, shift, 1e-6))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiles_with_fullgraph(backend):
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    modulation = torch.randn(2, 32, device=DEVICE, requires_grad=True)

    def fn(x, modulation):
        shift, scale = modulation.chunk(2, dim=1)
        return layernorm_modulate(x, shift, scale, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, modulation)
    loss.backward()
    grads = (x.grad.clone(), modulation.grad.clone())
    x.grad = modulation.grad = None
    fn(x, modulation).backward()
    assert rel_err(loss, fn(x, modulation)) <= 1e-6
    assert rel_err(grads[0], x.grad) <= 1e-5 and rel_err(grads[1], modulation.grad) <= 1e-5


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"x must be \(B, S, D\)"):
        layernorm_modulate(x[0], torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"scale must be \(B, D\) = \(2, 8\)"):
        layernorm_modulate(x, torch.zeros(2, 8), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="shift is on meta, expected x's device cpu"):
        layernorm_modulate(x, torch.zeros(2, 8, device="meta"), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="scale must be floating point"):
        layernorm_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (([[0.0]], torch.zeros(2, 8), torch.zeros(2, 8)), {}, TypeError, "x must be a torch.Tensor, got list"),
        ((torch.zeros(2, 3, 8), None, torch.zeros(2, 8)), {}, TypeError, "shift must be a torch.Tensor, got NoneType"),
        ((torch.zeros(2, 3, 8, dtype=torch.int32), torch.zeros(2, 8), torch.zeros(2, 8)), {}, ValueError,
         "x must be floating point, got torch.int32"),
        ((torch.zeros(2, 3, 0), torch.zeros(2, 0), torch.zeros(2, 0)), {}, ValueError,
         r"x must be \(B, S, D\) with D >= 1, got shape \(2, 3, 0\)"),
        ((torch.zeros(2, 3, 8), torch.zeros(2, 8), torch.zeros(2, 8)), {"eps": True}, TypeError,
         "eps must be a real number .float., got bool"),
        ((torch.zeros(2, 3, 8), torch.zeros(2, 8), torch.zeros(2, 8)), {"eps": "1e-6"}, TypeError,
         "eps must be a real number .float., got str"),
        ((torch.zeros(2, 3, 8), torch.zeros(2, 8), torch.zeros(2, 8)), {"eps": float("nan")}, ValueError,
         "eps must be finite and >= 0, got nan"),
        ((torch.zeros(2, 3, 8), torch.zeros(2, 8), torch.zeros(2, 8)), {"eps": -1e-6}, ValueError,
         "eps must be finite and >= 0, got -1e-06"),
    ],
)
def test_more_bad_inputs_name_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=f"layernorm_modulate: {message}"):
        layernorm_modulate(*args, **kwargs)


def test_mixed_dtypes_compute_in_the_promoted_dtype():
    x = torch.randn(2, 3, 8)
    shift, scale = torch.randn(2, 8).bfloat16(), torch.randn(2, 8).bfloat16()
    y = layernorm_modulate(x, shift, scale)
    assert y.dtype == torch.float32
    shift64, scale64 = shift.double(), scale.double()
    expected = torch.nn.functional.layer_norm(x.double(), (8,), eps=1e-6) * (1 + scale64[:, None]) + shift64[:, None]
    assert rel_err(y, expected) <= 1e-6


def test_auto_backend_per_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = LayerNormModulateInputs(torch.device("cpu"), torch.float32, False, 64)
    assert BACKENDS.select(inputs).name == "reference"
    with pytest.raises(NoBackendError, match="device cpu not supported"):
        BACKENDS.select(inputs, "triton")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in BACKENDS.get("triton").unavailable_reason()
    assert list(BACKENDS.priority(LayerNormModulateInputs(torch.device("cuda"), torch.bfloat16, True, 64))) == [
        "triton", "reference"]


def test_environment_override_and_its_old_name(monkeypatch):
    inputs = LayerNormModulateInputs(torch.device("cpu"), torch.float32, False, 64)
    monkeypatch.delenv("SOFTVQ_FAST_LN_MODULATE_BACKEND", raising=False)
    monkeypatch.setenv("SOFTVQ_FAST_LAYERNORM_MODULATE_BACKEND", "nope")
    with pytest.raises(ValueError, match="layernorm_modulate: unknown backend 'nope'"):
        BACKENDS.select(inputs)
    monkeypatch.delenv("SOFTVQ_FAST_LAYERNORM_MODULATE_BACKEND")
    monkeypatch.setenv("SOFTVQ_FAST_LN_MODULATE_BACKEND", "nope")
    with pytest.warns(FutureWarning, match="SOFTVQ_FAST_LN_MODULATE_BACKEND is deprecated; set "
                                                "SOFTVQ_FAST_LAYERNORM_MODULATE_BACKEND"):
        with pytest.raises(ValueError, match="unknown backend 'nope'"):
            BACKENDS.select(inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_at_sit_xl_width(dtype):
    x, modulation = _inputs(4, 257, 1152, dtype, device="cuda")
    y, dx, dmod, grad = _forward_backward(x, modulation, "triton")
    y64, dx64, dmod64 = _reference(x, modulation, grad)
    tol = TOLERANCE[dtype]
    assert rel_err(y, y64) <= tol and rel_err(dx, dx64) <= tol
    assert rel_err(dmod[:, :2304], dmod64[:, :2304]) <= tol
