"""lpips_distance (one LPIPS layer, fused): every backend against the formula in float64, with the
gradients of fx, fy and the head in every combination, zero-feature pixels, strided inputs, the CPU
kernel builds, bad inputs, opcheck and torch.compile. Triton runs in its interpreter on the CPU
(small shapes)."""
from __future__ import annotations

import pytest
import torch

from softvq_fast.dispatch import NoBackendError, registered_ops
from softvq_fast.ops.lpips_distance import BACKENDS, LpipsDistanceInputs, lpips_distance
from support.numerics import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
EPS = 1e-10
FUSED = ["cpu", "triton"]
# C = 130 makes the CPU kernel's tiles 32 pixels wide; P = 561 and 200 end in a partial tile / block.
CPU_SHAPES = [(1, 3, 7, 9), (2, 5, 1, 1), (3, 64, 33, 17), (2, 130, 5, 40)]
TRITON_SHAPES = [(1, 3, 7, 9), (2, 5, 1, 1), (3, 6, 33, 17)]
NEEDS = [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (True, True, True)]


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _skip_unavailable(backend: str) -> None:
    reason = BACKENDS.get(backend).unavailable_reason()
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _problem(shape, dtype, device, need=(True, True, True)):
    """fx, fy (B, C, H, W) with fy near fx, as for an image and its reconstruction; weight (C,) >= 0."""
    fx = torch.randn(shape, device=device)
    fy = fx + 0.7 * torch.randn(shape, device=device)
    weight = torch.rand(shape[1], device=device)
    return [t.to(dtype).requires_grad_(needed) for t, needed in zip((fx, fy, weight), need)]


def _formula(fx, fy, weight, eps=EPS):
    """The LPIPS layer distance as written in the task, for float64 inputs."""
    a = fx / (fx.square().sum(1, keepdim=True).sqrt() + eps)
    b = fy / (fy.square().sum(1, keepdim=True).sqrt() + eps)
    return ((a - b).square() * weight[:, None, None]).sum(1).mean((1, 2))


def _gradients(out, inputs, grad_out):
    """[d out / d t for t in inputs], None for each input that does not require grad."""
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [next(grads) if t.requires_grad else None for t in inputs]


def _float64(fx, fy, weight, grad_out, eps=EPS):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (fx, fy, weight)]
    out = _formula(*leaves, eps)
    return out, _gradients(out, leaves, grad_out.double())


def _assert_matches_float64(backend, fx, fy, weight, eps=EPS):
    dtype = fx.dtype
    grad_out = torch.randn(fx.shape[0], device=fx.device).to(dtype)
    out = lpips_distance(fx, fy, weight, eps=eps, backend=backend)
    grads = _gradients(out, (fx, fy, weight), grad_out)
    out64, grads64 = _float64(fx, fy, weight, grad_out, eps)
    tol = TOLERANCE[dtype]
    assert out.shape == (fx.shape[0],) and out.dtype == dtype
    assert rel_err(out, out64) <= tol
    for name, grad, grad64 in zip(("fx", "fy", "weight"), grads, grads64):
        if grad64 is None:
            assert grad is None, name
        else:
            assert grad.dtype == dtype and rel_err(grad, grad64) <= tol, name


@pytest.fixture
def poisoned_allocations():
    """Deterministic mode fills every fresh float buffer (torch.empty, and at::empty in the C++
    kernels) with NaN, so an element a kernel forgets to write shows up."""
    mode, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(mode)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_cpu_matches_float64(shape, dtype, poisoned_allocations):
    _skip_unavailable("cpu")
    _assert_matches_float64("cpu", *_problem(shape, dtype, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_float64(shape, dtype, poisoned_allocations):
    _skip_unavailable("triton")
    _assert_matches_float64("triton", *_problem(shape, dtype, DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_matches_float64(dtype):
    _assert_matches_float64("reference", *_problem((2, 5, 7, 9), dtype, "cpu"))


@pytest.mark.parametrize("backend", FUSED)
def test_float16(backend):
    _skip_unavailable(backend)
    _assert_matches_float64(backend, *_problem((2, 7, 5, 6), torch.float16, _device(backend)))


@pytest.mark.parametrize("need", NEEDS, ids=lambda need: "+".join(n for n, x in zip(("fx", "fy", "w"), need) if x))
@pytest.mark.parametrize("backend", FUSED)
def test_only_the_gradients_needed(backend, need, poisoned_allocations):
    _skip_unavailable(backend)
    _assert_matches_float64(backend, *_problem((2, 6, 9, 7), torch.float32, _device(backend), need))


@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("backend", FUSED)
def test_other_eps(backend, eps, poisoned_allocations):
    """eps = 0 is the plain normalisation (finite without zero-feature pixels), in blocks that end
    past the pixels too; a large one shows whether eps is added where it belongs."""
    _skip_unavailable(backend)
    _assert_matches_float64(backend, *_problem((2, 5, 7, 9), torch.float32, _device(backend)), eps=eps)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_strided_inputs(backend):
    """fx a channel slice, fy channels-last, weight every other element of a longer vector."""
    _skip_unavailable(backend)
    device = _device(backend)
    fx = torch.randn(2, 10, 6, 7, device=device, requires_grad=True)[:, ::2]
    fy = torch.randn(2, 5, 6, 7, device=device).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.rand(10, device=device, requires_grad=True)[::2]
    assert not (fx.is_contiguous() or fy.is_contiguous() or weight.is_contiguous())
    _assert_matches_float64(backend, fx, fy, weight)


def _closed_form_gradients(fx, fy, weight, grad_out):
    """The gradients in float64 from the derivation (csrc/cpu/lpips_distance_kernel.h), the term
    x / (s^2 n) * sum_c G_c x_c taken as 0 where n = 0 (x = 0 there)."""
    x, y, w, g = (t.detach().double() for t in (fx, fy, weight, grad_out))
    pixels = x.shape[2] * x.shape[3]
    norm_x, norm_y = x.square().sum(1, keepdim=True).sqrt(), y.square().sum(1, keepdim=True).sqrt()
    d = x / (norm_x + EPS) - y / (norm_y + EPS)
    G = 2 * w[:, None, None] * d * (g / pixels)[:, None, None, None]

    def through_normalisation(G, x, norm):
        s = norm + EPS
        return G / s - x * torch.where(norm > 0, 1 / (s * s * norm), 0.0) * (G * x).sum(1, keepdim=True)

    grad_w = (d.square().mean((2, 3)) * g[:, None]).sum(0)
    return through_normalisation(G, x, norm_x), through_normalisation(-G, y, norm_y), grad_w


@pytest.mark.parametrize("backend", FUSED)
def test_zero_feature_pixels_give_finite_gradients(backend):
    """Where every channel of fx (or fy) is 0, the eager formula's autograd gives NaN; the fused
    backends give the derivation's value, G / eps there."""
    _skip_unavailable(backend)
    fx, fy, weight = _problem((2, 5, 4, 6), torch.float32, _device(backend))
    with torch.no_grad():
        fx[0, :, 0, 0] = 0
        fy[1, :, 2, 3] = 0
        fx[1, :, 3, 5] = fy[1, :, 3, 5] = 0
    grad_out = torch.randn(2, device=fx.device)
    out = lpips_distance(fx, fy, weight, backend=backend)
    grads = _gradients(out, (fx, fy, weight), grad_out)
    out64, grads64 = _float64(fx, fy, weight, grad_out)
    assert rel_err(out, out64) <= 1e-5
    assert grads64[0].isnan().any() and grads64[1].isnan().any()
    expected = _closed_form_gradients(fx, fy, weight, grad_out)
    nonzero = (fx.detach().abs().sum(1) > 0) & (fy.detach().abs().sum(1) > 0)
    for name, grad, grad64, exact in zip(("fx", "fy", "weight"), grads, grads64, expected):
        assert grad.isfinite().all() and rel_err(grad, exact) <= 1e-5, name
        if name != "weight":  # elsewhere, what autograd gives
            assert rel_err(grad.movedim(1, -1)[nonzero], grad64.movedim(1, -1)[nonzero]) <= 1e-5, name


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_cpu_kernel_build(monkeypatch, isa):
    """csrc/cpu compiles the kernels per instruction set; SOFTVQ_FAST_CPU_ISA forces one."""
    _skip_unavailable("cpu")
    monkeypatch.setenv("SOFTVQ_FAST_CPU_ISA", isa)
    try:
        lpips_distance(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(1), backend="cpu")
    except RuntimeError as exc:
        if "does not support it" in str(exc):
            pytest.skip(f"this CPU cannot run the {isa} build")
        raise
    for dtype in (torch.float32, torch.bfloat16):
        _assert_matches_float64("cpu", *_problem((2, 130, 5, 40), dtype, "cpu"))


def test_cpu_results_do_not_depend_on_the_thread_count():
    _skip_unavailable("cpu")
    fx, fy, weight = _problem((1, 64, 40, 48), torch.float32, "cpu")  # 15 tiles of 128 pixels: 3 threads share them
    grad_out = torch.randn(1)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3, 3, 3):  # several runs: an order that depends on scheduling differs in some
            torch.set_num_threads(count)
            out = lpips_distance(fx, fy, weight, backend="cpu")
            results.append([out, *_gradients(out, (fx, fy, weight), grad_out)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run in results[1:] for a, b in zip(results[0], run))


@pytest.mark.parametrize("backend", FUSED)
def test_empty_batch(backend):
    _skip_unavailable(backend)
    fx, fy, weight = _problem((0, 3, 4, 5), torch.float32, _device(backend))
    out = lpips_distance(fx, fy, weight, backend=backend)
    assert out.shape == (0,)
    grads = _gradients(out, (fx, fy, weight), torch.ones_like(out))
    assert grads[0].shape == fx.shape and grads[1].shape == fy.shape and torch.equal(grads[2], torch.zeros_like(weight))


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_differentiates_the_formula(backend):
    """create_graph=True: the gradients come from the eager formula, differentiable again."""
    _skip_unavailable(backend)
    results = []
    for name in (backend, "reference"):
        torch.manual_seed(3)
        fx, fy, weight = _problem((2, 4, 3, 5), torch.float32, _device(backend), (True, False, True))
        grad_fx, = torch.autograd.grad(lpips_distance(fx, fy, weight, backend=name).sum(), fx, create_graph=True)
        grad_fx.square().sum().backward()
        results.append((grad_fx, fx.grad, weight.grad))
    for ours, eager in zip(*results):
        assert rel_err(ours, eager) <= 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    _skip_unavailable(backend)
    fx, fy, weight = _problem((2, 5, 3, 4), torch.float32, _device(backend), (True, False, True))
    torch.library.opcheck(torch.ops.softvq_fast.lpips_distance_forward.default, (fx, fy, weight, EPS, backend))
    _, norm_x, norm_y = torch.ops.softvq_fast.lpips_distance_forward(fx.detach(), fy, weight.detach(), EPS, backend)
    for need in NEEDS:
        args = (torch.randn(2, device=fx.device), fx.detach(), fy, weight.detach(), norm_x, norm_y, EPS, *need, backend)
        torch.library.opcheck(torch.ops.softvq_fast.lpips_distance_backward.default, args)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_compiles_with_fullgraph(backend):
    _skip_unavailable(backend)
    fx, fy, weight = _problem((2, 5, 6, 7), torch.float32, _device(backend), (True, False, True))

    def loss(fx, fy, weight):
        return lpips_distance(fx, fy, weight, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(fx, fy, weight)
    grads = torch.autograd.grad(value, (fx, weight))
    eager_value = loss(fx, fy, weight)
    eager_grads = torch.autograd.grad(eager_value, (fx, weight))
    assert rel_err(value, eager_value) <= 1e-6
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(grads, eager_grads))


def _features(*shape, **kwargs):
    return torch.zeros(shape or (2, 3, 4, 5), **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (([[0.0]], _features(), torch.ones(3)), {}, TypeError, "fx must be a torch.Tensor, got list"),
        ((_features(), None, torch.ones(3)), {}, TypeError, "fy must be a torch.Tensor, got NoneType"),
        ((_features(), _features(), 1.0), {}, TypeError, "weight must be a torch.Tensor, got float"),
        ((_features(3, 4, 5), _features(3, 4, 5), torch.ones(3)), {}, ValueError,
         r"fx must be \(B, C, H, W\) with C, H, W >= 1, got shape \(3, 4, 5\)"),
        ((_features(2, 0, 4, 5), _features(2, 0, 4, 5), torch.ones(0)), {}, ValueError,
         r"fx must be \(B, C, H, W\) with C, H, W >= 1, got shape \(2, 0, 4, 5\)"),
        ((_features(2, 3, 0, 5), _features(2, 3, 0, 5), torch.ones(3)), {}, ValueError,
         r"fx must be \(B, C, H, W\) with C, H, W >= 1"),
        ((_features(), _features(2, 3, 5, 4), torch.ones(3)), {}, ValueError,
         r"fy must have fx's shape \(2, 3, 4, 5\), got \(2, 3, 5, 4\)"),
        ((_features(), _features(), torch.ones(1, 3, 1, 1)), {}, ValueError,
         r"weight must be \(C,\) = \(3,\) for features of shape \(2, 3, 4, 5\), got \(1, 3, 1, 1\) \(a 1x1 conv"),
        ((_features(), _features(), torch.ones(4)), {}, ValueError, r"weight must be \(C,\) = \(3,\)"),
        ((_features(dtype=torch.int32), _features(dtype=torch.int32), torch.ones(3, dtype=torch.int32)), {},
         TypeError, "fx must be float32, bfloat16 or float16 .float64: reference backend only., got torch.int32"),
        ((_features(), _features(dtype=torch.float64), torch.ones(3)), {}, TypeError,
         "fy dtype torch.float64 differs from fx dtype torch.float32"),
        ((_features(), _features(), torch.ones(3, dtype=torch.bfloat16)), {}, TypeError,
         "weight dtype torch.bfloat16 differs from fx dtype torch.float32"),
        ((_features(), _features(device="meta"), torch.ones(3)), {}, ValueError,
         "fy is on meta, expected fx's device cpu"),
        ((_features(), _features(), torch.ones(3, device="meta")), {}, ValueError,
         "weight is on meta, expected fx's device cpu"),
        ((_features(), _features(), torch.ones(3)), {"eps": True}, TypeError,
         "eps must be a real number .float., got bool"),
        ((_features(), _features(), torch.ones(3)), {"eps": "1e-10"}, TypeError,
         "eps must be a real number .float., got str"),
        ((_features(), _features(), torch.ones(3)), {"eps": float("nan")}, ValueError,
         "eps must be finite and >= 0, got nan"),
        ((_features(), _features(), torch.ones(3)), {"eps": -1.0}, ValueError, "eps must be finite and >= 0, got -1.0"),
        ((_features(), _features(), torch.ones(3)), {"backend": "nope"}, ValueError,
         "unknown backend 'nope'; expected one of: auto, reference, cpu, triton"),
    ],
)
def test_bad_inputs_name_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=f"lpips_distance: {message}"):
        lpips_distance(*args, **kwargs)


def test_float64_runs_on_the_reference_only():
    _skip_unavailable("cpu")
    fx, fy, weight = _problem((1, 3, 2, 2), torch.float64, "cpu")
    with pytest.raises(NoBackendError, match=r"backend 'cpu' \(requested\) cannot run these inputs: dtype float64"):
        lpips_distance(fx, fy, weight, backend="cpu")


def test_auto_backend_per_device(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_LPIPS_DISTANCE_BACKEND", raising=False)
    cpu = LpipsDistanceInputs(torch.device("cpu"), torch.float32, True)
    expected = "cpu" if BACKENDS.get("cpu").unavailable_reason() is None else "reference"
    assert BACKENDS.select(cpu).name == expected
    assert BACKENDS.select(LpipsDistanceInputs(torch.device("cpu"), torch.float64, True)).name == "reference"
    assert list(BACKENDS.priority(LpipsDistanceInputs(torch.device("cuda"), torch.bfloat16, True))) == [
        "triton", "reference"]
    monkeypatch.setenv("SOFTVQ_FAST_LPIPS_DISTANCE_BACKEND", "reference")
    assert BACKENDS.select(cpu).name == "reference"
    assert "lpips_distance" in registered_ops()
