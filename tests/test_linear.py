"""softvq_fast.ops.linear: backends against float64, the automatic order, errors, torch.compile,
and the drop-in `softvq_fast.nn.Linear`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.machines import machine  # noqa: F401  (fixture)
from support.numerics import rel_err
from support.onednn import ONEDNN, needs_onednn

from softvq_fast.dispatch import NoBackendError
from softvq_fast.nn import Linear
from softvq_fast.nn.linear import set_linear_backend
from softvq_fast.ops import cpu_rules
from softvq_fast.ops import linear as linear_op
from softvq_fast.ops.linear import BACKENDS, LinearInputs, linear, select_backend

needs_cpu_kernels = pytest.mark.skipif(not linear_op._CPU_KERNELS, reason="the extension's linear kernels are not built")
MEASURED = ("AuthenticAMD", "AVX512", 2)  # the built-in table's linear rule: oneDNN first from 2^21 multiply-adds


REFERENCE_ACTIVATIONS = {
    "none": lambda y: y,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def _inputs(shape, out_features, dtype=torch.float32, bias=True, strided=False):
    """x (shape), weight, bias; `strided`: x, weight and bias are non-contiguous views (x as a
    slice of a packed projection is; a bias as torch.load can return one)."""
    in_features = shape[-1]
    if strided:
        x = torch.randn(*shape[:-1], in_features + 7, dtype=dtype)[..., 3 : 3 + in_features]
        weight = torch.randn(in_features, out_features, dtype=dtype).t() / in_features**0.5
        b = torch.randn(out_features, 2, dtype=dtype)[:, 1]
    else:
        x = torch.randn(*shape, dtype=dtype)
        weight = torch.randn(out_features, in_features, dtype=dtype) / in_features**0.5
        b = torch.randn(out_features, dtype=dtype)
    return x, weight, b if bias else None


def _reference(x, weight, bias, activation):
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return REFERENCE_ACTIVATIONS[activation](y)


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn), "torch"])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize(
    "shape,out_features,bias,strided",
    [((67,), 45, True, False), ((5, 131), 300, False, False), ((2, 37, 131), 45, True, True),
     ((3, 1, 9, 64), 129, True, False), ((70, 96), 257, True, True)],
)
def test_float32_matches_float64(backend, activation, shape, out_features, bias, strided):
    torch.manual_seed(hash((shape, out_features)) % 2**31)
    x, weight, b = _inputs(shape, out_features, bias=bias, strided=strided)
    with torch.no_grad():
        y = linear(x, weight, b, activation=activation, backend=backend)
    assert y.shape == (*shape[:-1], out_features) and y.dtype == torch.float32
    assert rel_err(y, _reference(x, weight, b, activation)) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
def test_torch_backend_other_dtypes(dtype, tol):
    torch.manual_seed(1)
    x, weight, b = _inputs((4, 19, 40), 33, dtype=dtype)
    with torch.no_grad():
        y = linear(x, weight, b, activation="gelu")
    assert y.dtype == dtype
    assert rel_err(y, _reference(x, weight, b, "gelu")) <= tol


@pytest.fixture
def onednn_training_calls(monkeypatch):
    """Counts the calls of the oneDNN training ops: the affine forward and the two backward GEMMs."""
    calls = {"affine": 0, "grad_input": 0, "grad_weight": 0}
    for name in calls:
        original = getattr(linear_op, f"_onednn_{name}")

        def record(*args, name=name, original=original):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(linear_op, f"_onednn_{name}", record)
    return calls


# (x shape, out_features, bias, strided): a vector, square weights (a transposed-weight bug shows),
# strided x, weight and bias, no bias.
GRADIENT_CASES = [((3, 21, 96), 130, True, False), ((96,), 96, True, False), ((2, 37, 131), 45, True, True),
                  ((5, 131), 300, False, False), ((70, 96), 96, True, True)]


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn), "torch"])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape,out_features,bias,strided", GRADIENT_CASES)
def test_gradients_match_float64(backend, activation, shape, out_features, bias, strided, onednn_training_calls):
    x, weight, b = _inputs(shape, out_features, bias=bias, strided=strided)
    grad = torch.randn(*shape[:-1], out_features, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    y = linear(*leaves, *([] if bias else [None]), activation=activation, backend=backend)
    y.backward(grad.float())
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    _reference(*(leaves64 if bias else leaves64 + [None]), activation).backward(grad)
    assert rel_err(y, _reference(*(t.detach() for t in leaves64), *([] if bias else [None]), activation)) <= 1e-5
    for got, want in zip(leaves, leaves64):
        assert rel_err(got.grad, want.grad) <= 1e-5
    expected = 1 if backend == "onednn" else 0
    assert onednn_training_calls == {"affine": expected, "grad_input": expected, "grad_weight": expected}
    tanh_kernel = backend == "onednn" and activation == "gelu_tanh" and linear_op._CPU_KERNELS
    assert ("gelu_tanh_cpu_forward" in type(y.grad_fn).__name__) == tanh_kernel


@needs_onednn
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)])
def test_onednn_training_saves_and_computes_only_what_is_needed(needs, onednn_training_calls):
    """Only x, weight or bias needs a gradient: the forward keeps weight for grad_input alone and
    x for grad_weight alone (as torch's linear does), and the backward runs only those GEMMs."""
    x, weight, b = _inputs((4, 9, 64), 80)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((x, weight, b), needs)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = linear(*leaves, backend="onednn")
    assert sorted(saved) == sorted([weight.shape] * needs[0] + [x.shape] * needs[1])
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves64 = [t.detach().double().requires_grad_(need) for t, need in zip(leaves, needs)]
    _reference(*leaves64, "none").backward(grad.double())
    for got, want, need in zip(leaves, leaves64, needs):
        assert (got.grad is None) == (not need)
        if need:
            assert rel_err(got.grad, want.grad) <= 1e-5
    assert onednn_training_calls == {"affine": 1, "grad_input": int(needs[0]), "grad_weight": int(needs[1])}


@needs_onednn
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_onednn_double_backward_matches_float64(activation, onednn_training_calls):
    """create_graph=True: the backward is made of torch's differentiable products; the second
    backward (without create_graph) reaches the op's own backward once, through the GELU."""
    x, weight, b = _inputs((3, 11, 48), 40)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    leaves64 = [t.double().requires_grad_() for t in (x, weight, b)]
    for tensors, y in ((leaves, linear(*leaves, activation=activation, backend="onednn")),
                       (leaves64, _reference(*leaves64, activation))):
        grad_x, = torch.autograd.grad(y.square().sum(), tensors[0], create_graph=True)
        grad_x.square().sum().backward()
    for got, want in zip(leaves, leaves64):
        assert rel_err(got.grad, want.grad) <= 1e-5
    assert onednn_training_calls == {"affine": 1, "grad_input": 1, "grad_weight": 1}


@needs_onednn
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("modified", [False, True])
def test_onednn_mlp_computes_the_activation_again_instead_of_keeping_it(activation, modified):
    """fc1 -> GELU -> fc2 on the training path: fc2 keeps the GELU's input (which the GELU's
    backward keeps anyway) rather than its output, and computes the output again in its backward;
    an output modified in place before fc2 is kept as it is. Gradients, also of a double backward,
    against float64."""
    x, w1, b1 = _inputs((3, 13, 40), 72)
    _, w2, b2 = _inputs((1, 72), 24)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    leaves64 = [t.double().requires_grad_() for t in (x, w1, b1, w2, b2)]

    def mlp(x, w1, b1, w2, b2, reference=False):
        h = _reference(x, w1, b1, activation) if reference else linear(x, w1, b1, activation=activation, backend="onednn")
        if modified:
            h.mul_(1.5)
        return (_reference(h, w2, b2, "none") if reference else linear(h, w2, b2, backend="onednn")), h

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, hidden = mlp(*leaves)
    assert any(t.data_ptr() == hidden.data_ptr() for t in saved) == modified
    y64, _ = mlp(*leaves64, reference=True)
    grad = torch.randn(y.shape, dtype=torch.float64)
    (torch.autograd.grad(y, leaves[0], grad.float(), create_graph=True)[0].square().sum() + (y * grad).sum()).backward()
    (torch.autograd.grad(y64, leaves64[0], grad, create_graph=True)[0].square().sum() + (y64 * grad).sum()).backward()
    assert rel_err(y, y64) <= 1e-5
    for got, want in zip(leaves, leaves64):
        assert rel_err(got.grad, want.grad) <= 1e-5


@needs_onednn
def test_onednn_training_with_empty_dimensions():
    """No rows, no outputs: zero gradients of the right shapes; no input features: torch (oneDNN
    rejects an empty reduction), and an explicit onednn says why."""
    for shape, out_features in (((0, 8), 5), ((2, 0, 8), 5), ((4, 8), 0)):
        leaves = [t.requires_grad_() for t in _inputs(shape, out_features)]
        y = linear(*leaves, activation="gelu", backend="onednn")
        assert y.shape == (*shape[:-1], out_features)
        y.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape and not t.grad.any() for t in leaves)
    x, weight, b = (t.requires_grad_() for t in _inputs((4, 0), 5))
    assert select_backend(x, weight, b).name == "torch"
    with pytest.raises(NoBackendError, match="in_features is 0"):
        linear(x, weight, b, backend="onednn")


@needs_onednn
def test_auto_order(machine, monkeypatch, onednn_calls):
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine(*MEASURED)
    large = _inputs((2, 289, 768), 768)  # the tokenizer's attention projection at batch 2
    with torch.no_grad():
        assert select_backend(*large).name == "onednn"
        linear(*large)
        assert len(onednn_calls.weights) == 1
        linear(*_inputs((2, 768), 768))  # below the rule's 2^21 multiply-adds: torch
        linear(*_inputs((2, 4096, 16), 768))  # 16 input features: torch
        assert len(onednn_calls.weights) == 1
        monkeypatch.setenv("SOFTVQ_FAST_LINEAR_BACKEND", "torch")
        linear(*large)
        assert len(onednn_calls.weights) == 1
        monkeypatch.setenv("SOFTVQ_FAST_LINEAR_BACKEND", "onednn")
        linear(*_inputs((2, 768), 768))  # an explicit choice runs whatever the size
        assert len(onednn_calls.weights) == 2
    monkeypatch.delenv("SOFTVQ_FAST_LINEAR_BACKEND")
    x, weight, b = large
    linear(x, weight.requires_grad_(), b)  # with a gradient, in the forward+backward window: onednn
    assert len(onednn_calls.weights) == 3  # (the training op's forward runs the forward-only op)
    small_x, small_weight, small_b = _inputs((2, 289, 768), 64)  # 2^23.5 multiply-adds: torch with a gradient
    linear(small_x, small_weight.requires_grad_(), small_b)
    with torch.no_grad():
        linear(small_x, small_weight, small_b)  # but onednn without one
    assert len(onednn_calls.weights) == 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight, b).dtype == torch.bfloat16  # autocast: torch's cast, as nn.Linear
    assert len(onednn_calls.weights) == 4
    machine("GenuineIntel", "AVX512+AMX", 2)  # measured for attention only: torch first
    with torch.no_grad():
        linear(*large)
    linear(*large)
    assert len(onednn_calls.weights) == 4


def test_rule_windows_bound_the_multiply_adds_and_input_features(machine):
    machine(*MEASURED)
    rule = cpu_rules.cpu_rule("linear")
    assert rule.first == "onednn" and set(rule.windows) == {(torch.float32, False), (torch.float32, True)}

    def first(macs, in_features, dtype=torch.float32, needs_grad=False):
        inputs = LinearInputs(torch.device("cpu"), dtype, needs_grad, dtype, False, False, macs, in_features)
        return BACKENDS.priority(inputs)[0]

    assert first(2**21, 64) == "onednn" and first(2**40, 4096) == "onednn"
    assert first(2**21 - 1, 64) == "torch" and first(2**21, 63) == "torch"
    assert first(2**21, 64, torch.bfloat16) == "torch" and first(2**21, 64, needs_grad=True) == "torch"
    # with a gradient: from 2^25 multiply-adds and 256 input features
    assert first(2**25, 256, needs_grad=True) == "onednn" and first(2**40, 4096, needs_grad=True) == "onednn"
    assert first(2**25 - 1, 256, needs_grad=True) == "torch" and first(2**25, 255, needs_grad=True) == "torch"
    assert first(2**25, 256, torch.bfloat16, needs_grad=True) == "torch"


@needs_onednn
def test_the_trainers_report_the_backend_of_a_micro_batchs_rows(machine, monkeypatch):
    """The backend a training run logs is what its layers pick at the micro-batch's size."""
    from softvq_fast.training.loop import linear_backend

    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine(*MEASURED)
    layer = Linear(256, 768)
    assert linear_backend(layer, 1, torch.device("cpu")) == "torch"  # 2^17.6 multiply-adds
    assert linear_backend(layer, 16 * 16, torch.device("cpu")) == "onednn"  # 2^25.6


@needs_onednn
def test_choice_follows_set_num_threads(machine, monkeypatch, onednn_calls):
    """The rule was measured at 2 threads: at 1 or 4 threads torch goes first, read per call."""
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine(*MEASURED)
    large = _inputs((2, 289, 768), 768)
    with torch.no_grad():
        for threads in (2, 1, 4, 2):
            torch.set_num_threads(threads)
            linear(*large)
    assert len(onednn_calls.weights) == 2


def test_the_old_environment_variable_still_works_with_a_warning(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_LINEAR_BACKEND", raising=False)
    monkeypatch.setenv("SOFTVQ_FAST_LINEAR", "torch")
    x, weight, b = _inputs((600, 96), 200)
    with pytest.warns(FutureWarning, match="SOFTVQ_FAST_LINEAR is deprecated; set SOFTVQ_FAST_LINEAR_BACKEND"):
        assert select_backend(x, weight, b).name == "torch"


@needs_onednn
def test_explicit_onednn_lists_its_reasons():
    x, weight, b = _inputs((4, 64), 64)
    with torch.no_grad():
        with pytest.raises(NoBackendError, match=r"dtype bfloat16 not supported.*weight dtype torch.float32 differs"):
            select_backend(x.bfloat16(), weight, b, backend="onednn")
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
    with pytest.raises(ValueError, match=r"activation must be one of .*, got \['gelu'\]"):
        linear(x, weight, b, activation=["gelu"])
    with pytest.raises(TypeError, match="linear: x must be a torch.Tensor, got list"):
        linear(x.tolist(), weight, b)
    with pytest.raises(TypeError, match="linear: bias must be a torch.Tensor or None, got float"):
        linear(x, weight, 0.0)
    with pytest.raises(TypeError, match="linear: weight dtype torch.float64 differs from x dtype torch.float32"):
        linear(x, weight.double(), b)
    with pytest.raises(TypeError, match="linear: bias dtype torch.bfloat16 differs from x dtype torch.float32"):
        linear(x, weight, b.bfloat16())
    with pytest.raises(ValueError, match="linear: weight is on meta, expected x's device cpu"):
        linear(x, weight.to("meta"), b)  # torch returned an unwritten CPU tensor
    with pytest.raises(ValueError, match="linear: bias is on meta, expected x's device cpu"):
        linear(x, weight, b.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts mixed dtypes itself
        assert linear(x, weight.bfloat16(), b).dtype == torch.bfloat16


@needs_onednn
def test_opcheck_onednn_custom_op():
    x, weight, b = _inputs((3, 5, 40), 24)
    strided = _inputs((3, 5, 40), 24, strided=True)
    for args in ((x, weight, b, "gelu"), (x, weight, None, "none"), (*strided, "gelu_tanh")):
        torch.library.opcheck(torch.ops.softvq_fast.linear_onednn.default, args)
    for args in ((x, weight, b), (x, weight, None), strided, (x[0, 0], weight, b)):
        trainable = tuple(None if t is None else t.clone().requires_grad_() for t in args)
        torch.library.opcheck(torch.ops.softvq_fast.linear_onednn_affine.default, trainable)
    grad = torch.randn(3, 5, 24)
    for grad_out, rows in ((grad, x), (grad.transpose(0, 1), strided[0].transpose(0, 1)), (grad[0, 0], x[0, 0])):
        torch.library.opcheck(torch.ops.softvq_fast.linear_onednn_grad_input.default, (grad_out, strided[1]))
        for with_bias in (True, False):
            torch.library.opcheck(torch.ops.softvq_fast.linear_onednn_grad_weight.default, (grad_out, rows, with_bias))


@needs_cpu_kernels
def test_opcheck_cpu_kernel_ops():
    x = torch.randn(37, 45)
    torch.library.opcheck(torch.ops.softvq_fast.gelu_tanh_cpu_forward.default, (x.clone().requires_grad_(),))
    torch.library.opcheck(torch.ops.softvq_fast.gelu_tanh_cpu_forward.default, (x.t(),))
    torch.library.opcheck(torch.ops.softvq_fast.gelu_tanh_cpu_backward.default, (torch.randn(45, 37), x.t()))
    for rows, with_column_sums in ((x, True), (x[:, 3:40], False), (x.t(), True)):
        torch.library.opcheck(torch.ops.softvq_fast.transpose_cpu.default, (rows, with_column_sums))


@needs_cpu_kernels
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_kernels_match_float64_in_every_build(isa, monkeypatch):
    """The tanh GELU and its derivative (float64 reference from the math), and the transpose with
    column sums, in each instruction-set build: lengths and shapes that are not multiples of a
    vector or tile, strided rows, large |x| where the exponential saturates."""
    monkeypatch.setenv("SOFTVQ_FAST_CPU_ISA", isa)
    ops = torch.ops.softvq_fast
    try:
        ops.transpose_cpu(torch.ones(1, 1), False)
    except RuntimeError as exc:
        if "does not support" in str(exc):
            pytest.skip(f"this CPU has no {isa}")
        raise
    for n in (1, 15, 17, 4099):
        x = torch.randn(n) * 4
        x[1::3] *= 10  # into both tails, where the exponential saturates
        grad = torch.randn(n)
        x64 = x.double().requires_grad_()
        u = (2 / torch.pi) ** 0.5 * (x64 + 0.044715 * x64**3)
        y64 = 0.5 * x64 * (1 + torch.tanh(u))
        y64.backward(grad.double())
        assert rel_err(ops.gelu_tanh_cpu_forward(x), y64) <= 1e-5
        assert rel_err(ops.gelu_tanh_cpu_backward(grad, x), x64.grad) <= 1e-5
    for rows, cols, pad in ((1, 1, 0), (5, 3, 0), (17, 33, 2), (70, 96, 0), (129, 200, 7)):
        x = torch.randn(rows, cols + pad)[:, :cols]
        t, sums = ops.transpose_cpu(x, True)
        assert torch.equal(t, x.t()) and t.is_contiguous()
        assert rel_err(sums, x.double().sum(0)) <= 1e-6
        t, none = ops.transpose_cpu(x, False)
        assert torch.equal(t, x.t()) and none.shape == (0,)


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn), "torch", "auto"])
def test_compiles_with_fullgraph(backend):
    model = torch.nn.Sequential(Linear(64, 160, activation="gelu", linear_backend=backend),
                                Linear(160, 48, activation="gelu_tanh", linear_backend=backend))
    x = torch.randn(2, 300, 64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-5
    grad = torch.randn(2, 300, 48)
    tensors = (x, *model.parameters())
    eager = torch.autograd.grad(model(x), tensors, grad)
    for got, want in zip(torch.autograd.grad(compiled(x), tensors, grad), eager):
        assert rel_err(got, want) <= 1e-5


@needs_onednn
def test_forward_ad_and_torch_func_transforms_run_on_torch(machine, monkeypatch, onednn_calls):
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine(*MEASURED)
    torch.manual_seed(4)
    x, weight, b = _inputs((600, 96), 200)  # large enough for oneDNN in plain use
    tangent = torch.randn_like(x)
    want = F.gelu(F.linear(x, weight, b)), tangent @ weight.T * _gelu_derivative(F.linear(x, weight, b))
    out, jvp_out = torch.func.jvp(lambda x: linear(x, weight, b, activation="gelu"), (x,), (tangent,))
    assert rel_err(out, want[0]) <= 1e-5 and rel_err(jvp_out, want[1]) <= 1e-5
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        jvp_dual = torch.autograd.forward_ad.unpack_dual(linear(dual, weight, b, activation="gelu")).tangent
    assert jvp_dual is not None and rel_err(jvp_dual, want[1]) <= 1e-5
    batched = torch.func.vmap(lambda x: linear(x, weight, b))(x.reshape(6, 100, 96))
    assert rel_err(batched.reshape(600, 200), F.linear(x, weight, b)) <= 1e-5
    assert onednn_calls.weights == []
    with torch.no_grad():
        linear(x, weight, b)
    assert len(onednn_calls.weights) == 1


def _gelu_derivative(y):
    y = y.double()
    return (torch.special.ndtr(y) + y * torch.exp(-0.5 * y * y) / (2 * torch.pi) ** 0.5).float()


def test_meta_and_other_devices_run_on_torch():
    layer = Linear(8, 4, device="meta", activation="gelu")
    assert layer(torch.empty(2, 3, 8, device="meta")).shape == (2, 3, 4)
    assert select_backend(torch.empty(2, 8, device="meta"), layer.weight).name == "torch"


@needs_onednn
def test_checkpoint_with_a_strided_bias(tmp_path):
    # torch.load keeps strides and load_state_dict(assign=True) installs the tensors as they are.
    torch.manual_seed(5)
    weight, bias = torch.randn(256, 128), torch.randn(256, 2)[:, 0]
    torch.save({"weight": weight, "bias": bias}, tmp_path / "layer.pt")
    with torch.device("meta"):
        layer = Linear(128, 256, linear_backend="onednn")
    layer.load_state_dict(torch.load(tmp_path / "layer.pt"), assign=True)
    assert not layer.bias.is_contiguous()
    x = torch.randn(600, 128)
    with torch.no_grad():
        assert rel_err(layer(x), _reference(x, weight, bias, "none")) <= 1e-5


def test_module_checks_its_activation_when_built():
    with pytest.raises(ValueError, match=r"Linear: activation must be one of \['gelu', 'gelu_tanh', 'none'\], got 'relu'"):
        Linear(4, 5, activation="relu")  # used to fail only at the first forward


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


@pytest.mark.parametrize(
    "vendor, isa, threads, first",
    [(*MEASURED, "onednn"), ("AuthenticAMD", "AVX512", 1, "torch"), ("AuthenticAMD", "AVX512", 8, "torch"),
     ("GenuineIntel", "AVX512", 2, "torch"), ("AuthenticAMD", "AVX2", 2, "torch"), ("", "DEFAULT", 2, "torch")],
)
def test_only_the_measured_machine_puts_onednn_first(machine, monkeypatch, vendor, isa, threads, first):
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine(vendor, isa, threads)
    x, weight, b = _inputs((2, 289, 768), 768)
    with torch.no_grad():
        assert select_backend(x, weight, b).name == (first if ONEDNN else "torch")
    assert select_backend(x, weight.requires_grad_(), b).name == (first if ONEDNN else "torch")  # forward+backward


def test_benchmark_suite_rows(machine, monkeypatch, tmp_path):
    from bench.harness import Context
    from bench.suites import linear as suite

    monkeypatch.setattr(suite, "SHAPES", [("big", 64, 128, 256, "gelu"), ("small", 2, 16, 8, "none")])
    machine(*MEASURED)
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    rows = [r for r in suite.run(Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path)))
            if r.get("via", "softvq_fast") == "softvq_fast"]
    backends = ["onednn", "torch"] if ONEDNN else ["torch"]
    assert [(r["case"], r["backend"]) for r in rows] == [(case, b) for case in ("big", "small") for b in backends]
    assert [r["auto"] for r in rows] == ["onednn" if ONEDNN else "torch"] * len(backends) + ["torch"] * len(backends)
    assert all(r["median_ms"] > 0 and r["gflop_s"] > 0 for r in rows)
    assert suite.run(Context(device=torch.device("cuda"), quick=True, out_dir=str(tmp_path))) == []
