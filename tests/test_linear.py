"""softvq_fast.ops.linear: backends against float64, the automatic order, errors, torch.compile,
and the drop-in `softvq_fast.nn.Linear`."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import softvq_fast.ops.linear as linear_op
from softvq_fast.dispatch import NoBackendError
from softvq_fast.nn import Linear
from softvq_fast.nn.linear import set_linear_backend
from softvq_fast.ops.linear import linear, select_backend

ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")

REFERENCE_ACTIVATIONS = {
    "none": lambda y: y,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def _inputs(shape, out_features, dtype=torch.float32, bias=True, strided=False):
    in_features = shape[-1]
    if strided:  # a view with row stride > in_features, as a slice of a packed projection is
        x = torch.randn(*shape[:-1], in_features + 7, dtype=dtype)[..., 3 : 3 + in_features]
    else:
        x = torch.randn(*shape, dtype=dtype)
    weight = torch.randn(out_features, in_features, dtype=dtype) / in_features**0.5
    return x, weight, torch.randn(out_features, dtype=dtype) if bias else None


def _reference(x, weight, bias, activation):
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return REFERENCE_ACTIVATIONS[activation](y)


class _Recorder:
    """Stands in for the oneDNN custom op and counts its calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = linear_op._onednn_linear

        def record(*args):
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(linear_op, "_onednn_linear", record)


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn), "torch"])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize(
    "shape,out_features,bias,strided",
    [((67,), 45, True, False), ((5, 131), 300, False, False), ((2, 37, 131), 45, True, True), ((3, 1, 9, 64), 129, True, False)],
)
def test_float32_matches_float64(backend, activation, shape, out_features, bias, strided):
    torch.manual_seed(hash((shape, out_features)) % 2**31)
    x, weight, b = _inputs(shape, out_features, bias=bias, strided=strided)
    kept = x.clone()
    with torch.no_grad():
        y = linear(x, weight, b, activation=activation, backend=backend)
    assert y.shape == (*shape[:-1], out_features) and y.dtype == torch.float32
    assert rel_err(y, _reference(x, weight, b, activation)) <= 1e-5
    assert torch.equal(x, kept)  # the in-place activation never touches the input


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
def test_torch_backend_other_dtypes(dtype, tol):
    torch.manual_seed(1)
    x, weight, b = _inputs((4, 19, 40), 33, dtype=dtype)
    with torch.no_grad():
        y = linear(x, weight, b, activation="gelu")
    assert y.dtype == dtype
    assert rel_err(y, _reference(x, weight, b, "gelu")) <= tol


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
def test_gradients_match_float64(activation):
    torch.manual_seed(2)
    x, weight, b = _inputs((3, 21, 96), 130)
    grad = torch.randn(3, 21, 130, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    linear(*leaves, activation=activation).backward(grad.float())
    leaves64 = [t.double().requires_grad_() for t in (x, weight, b)]
    _reference(*leaves64, activation).backward(grad)
    for got, want in zip(leaves, leaves64):
        assert rel_err(got.grad, want.grad) <= 1e-5


@needs_onednn
def test_auto_order(monkeypatch):
    recorder = _Recorder(monkeypatch)
    monkeypatch.delenv("SOFTVQ_FAST_LINEAR", raising=False)
    monkeypatch.setattr(linear_op, "ONEDNN_FIRST_CPU", True)
    large = _inputs((2, 289, 768), 768)  # the tokenizer's attention projection at batch 2
    with torch.no_grad():
        assert select_backend(*large).name == "onednn"
        linear(*large)
        assert recorder.calls == 1
        linear(*_inputs((2, 768), 768))  # below ONEDNN_MIN_MACS: torch
        linear(*_inputs((2, 4096, 16), 768))  # 16 input features: torch
        assert recorder.calls == 1
        monkeypatch.setenv("SOFTVQ_FAST_LINEAR", "torch")
        linear(*large)
        assert recorder.calls == 1
        monkeypatch.setenv("SOFTVQ_FAST_LINEAR", "onednn")
        linear(*_inputs((2, 768), 768))  # an explicit choice runs whatever the size
        assert recorder.calls == 2
    monkeypatch.delenv("SOFTVQ_FAST_LINEAR")
    x, weight, b = large
    linear(x, weight.requires_grad_(), b)  # a gradient is needed: torch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight, b).dtype == torch.bfloat16  # autocast: torch's cast, as nn.Linear
    assert recorder.calls == 2
    monkeypatch.setattr(linear_op, "ONEDNN_FIRST_CPU", False)
    with torch.no_grad():
        linear(*large)
    assert recorder.calls == 2


@needs_onednn
def test_explicit_onednn_lists_its_reasons():
    x, weight, b = _inputs((4, 64), 64)
    with pytest.raises(NoBackendError, match="needs a gradient"):
        linear(x.requires_grad_(), weight, b, backend="onednn")
    with torch.no_grad():
        with pytest.raises(NoBackendError, match=r"dtype bfloat16 not supported.*weight dtype torch.float32 differs"):
            linear(x.bfloat16(), weight, b, backend="onednn")
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(NoBackendError, match="autocast"):
            linear(x, weight, b, backend="onednn")
    with pytest.raises(ValueError, match="unknown backend 'mkl'"):
        linear(x, weight, b, backend="mkl")


def test_bad_inputs_name_the_argument():
    x, weight, b = _inputs((4, 8), 5)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., in_features=8\)"):
        linear(x[:, :7], weight, b)
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        linear(x, weight[0], b)
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\) = \(5,\)"):
        linear(x, weight, b[:4])
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(x, weight, b, activation="relu")


@needs_onednn
def test_opcheck_onednn_custom_op():
    x, weight, b = _inputs((3, 5, 40), 24)
    for bias, activation in ((b, "gelu"), (None, "none")):
        torch.library.opcheck(torch.ops.softvq_fast.linear_onednn.default, (x, weight, bias, activation))


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn), "torch", "auto"])
def test_compiles_with_fullgraph(backend):
    model = torch.nn.Sequential(Linear(64, 160, activation="gelu", linear_backend=backend), Linear(160, 48, linear_backend=backend))
    x = torch.randn(2, 300, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-5
    if backend != "onednn":  # with gradients (the torch backend)
        compiled(x).sum().backward()
        assert model[0].weight.grad is not None


def test_module_is_a_drop_in_nn_linear():
    torch.manual_seed(3)
    plain = torch.nn.Linear(24, 40)
    ours = Linear(24, 40, activation="gelu_tanh")
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(6, 24)
    assert rel_err(ours(x), F.gelu(plain(x), approximate="tanh")) <= 1e-6
    assert "activation=gelu_tanh" in repr(ours)
    model = torch.nn.Sequential(ours, torch.nn.Sequential(Linear(40, 8)))
    set_linear_backend(model, "torch")
    assert [m.linear_backend for m in model.modules() if isinstance(m, Linear)] == ["torch", "torch"]


def test_cpu_rule_reads_the_vendor(monkeypatch):
    def cpuinfo(vendor):
        return lambda *args, **kwargs: io.StringIO(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu\n")

    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(linear_op, "open", cpuinfo("AuthenticAMD"), raising=False)
    assert linear_op._cpu_prefers_onednn()
    monkeypatch.setattr(linear_op, "open", cpuinfo("GenuineIntel"), raising=False)
    assert not linear_op._cpu_prefers_onednn()
    monkeypatch.setattr(linear_op, "open", cpuinfo("AuthenticAMD"), raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not linear_op._cpu_prefers_onednn()


def test_benchmark_suite_rows(monkeypatch, tmp_path):
    from bench.harness import Context
    from bench.suites import linear as suite

    monkeypatch.setattr(suite, "QUICK", [("big", 64, 128, 256, "gelu"), ("small", 2, 16, 8, "none")])
    monkeypatch.setattr(linear_op, "ONEDNN_FIRST_CPU", True)
    monkeypatch.delenv("SOFTVQ_FAST_LINEAR", raising=False)
    rows = suite.run(Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path)))
    backends = ["onednn", "torch"] if ONEDNN else ["torch"]
    assert [(r["case"], r["backend"]) for r in rows] == [(case, b) for case in ("big", "small") for b in backends]
    assert [r["auto"] for r in rows] == ["onednn" if ONEDNN else "torch"] * len(backends) + ["torch"] * len(backends)
    assert all(r["median_ms"] > 0 and r["gflop_s"] > 0 for r in rows)
    assert suite.run(Context(device=torch.device("cuda"), quick=True, out_dir=str(tmp_path))) == []
