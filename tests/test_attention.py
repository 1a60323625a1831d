"""softvq_fast.attention: kernels against float64, gradients through every backend, dispatch."""
from __future__ import annotations

import pytest
import torch

from support.attention_cases import poison, qkv, reference, reference_grads
from support.numerics import rel_err
from support.machines import machine  # noqa: F401  (fixture)
from softvq_fast._extension import extension_available, extension_has_cuda
from softvq_fast.dispatch import NoBackendError
from softvq_fast.ops import cpu_rules
from softvq_fast.ops.attention import BACKENDS, AttentionInputs, attention, backends, describe_inputs
from softvq_fast.ops.attention.custom_op import kernel_op_available

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
needs_kernel = pytest.mark.skipif(
    not extension_available() or not hasattr(torch.ops.softvq_fast, "attention_fwd"),
    reason="softvq_fast._C with attention_fwd is not built",
)


# (batch, q_len, kv_len, heads, head_dim): lengths 1 .. 1089, not powers of two, cross lengths too.
CPU_SHAPES = [
    (2, 1, 1, 3, 32),
    (2, 37, 37, 3, 72),
    (3, 33, 17, 2, 72),
    (1, 130, 259, 2, 80),
    (1, 5, 300, 1, 128),
    (2, 129, 129, 2, 64),
    (1, 321, 321, 2, 64),
    (1, 1089, 1089, 1, 64),
    (1, 1100, 61, 1, 32),
    (1, 67, 1033, 1, 128),  # k and v past the forward's single-block bound: 32-key blocks, online softmax
    (2, 45, 50, 2, 40),  # with 72: AVX-512 register blocks that end in a half vector (2.5, 4.5, 5.5)
    (1, 70, 70, 2, 88),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_float64(shape, dtype):
    q, k, v = qkv(*shape, dtype)
    poison(q.shape, dtype, "cpu")
    out, lse = torch.ops.softvq_fast.attention_fwd(q, k, v, 0.7 / shape[-1] ** 0.5)
    ref, ref_lse = reference(q, k, v, 0.7 / shape[-1] ** 0.5)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype], f"out rel err {rel_err(out, ref):.3g}"
    assert rel_err(lse, ref_lse) <= 1e-6, f"lse rel err {rel_err(lse, ref_lse):.3g}"



@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES[1:], ids=lambda s: "x".join(map(str, s)))  # one key: dq = dk = 0
def test_cpu_backward_matches_float64(shape, dtype):
    q, k, v = qkv(*shape, dtype)
    scale = 0.7 / shape[-1] ** 0.5
    out, lse = torch.ops.softvq_fast.attention_fwd(q, k, v, scale)
    grad = torch.randn(out.shape).to(dtype)
    for t in (q, k, v):
        poison(t.shape, dtype, "cpu")
    got = torch.ops.softvq_fast.attention_bwd(grad, q, k, v, out, lse, scale)
    for name, g, want in zip("qkv", got, reference_grads(q, k, v, scale, grad)):
        assert g.shape == want.shape and g.dtype == dtype
        assert rel_err(g, want) <= TOL[dtype], f"d{name} rel err {rel_err(g, want):.3g}"


@needs_kernel
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_cpu_build_matches_float64(isa, monkeypatch):
    """The kernel is compiled per instruction set; each build the CPU runs must be exact."""
    monkeypatch.setenv("SOFTVQ_FAST_CPU_ISA", isa)
    q, k, v = qkv(2, 45, 45, 2, 72, torch.float32)
    try:
        out, lse = torch.ops.softvq_fast.attention_fwd(q, k, v, 72**-0.5)
    except RuntimeError as exc:
        if "does not support" in str(exc):
            pytest.skip(f"this CPU has no {isa}")
        raise
    ref, _ = reference(q, k, v)
    assert rel_err(out, ref) <= 1e-5
    grad = torch.randn_like(out)
    got = torch.ops.softvq_fast.attention_bwd(grad, q, k, v, out, lse, 72**-0.5)
    for g, want in zip(got, reference_grads(q, k, v, 72**-0.5, grad)):
        assert rel_err(g, want) <= 1e-5


@needs_kernel
def test_cpu_build_switch_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv("SOFTVQ_FAST_CPU_ISA", "sse9")
    q, k, v = qkv(1, 4, 4, 1, 8, torch.float32)
    with pytest.raises(RuntimeError, match="SOFTVQ_FAST_CPU_ISA must be portable, avx2 or avx512"):
        torch.ops.softvq_fast.attention_fwd(q, k, v, 1.0)


def _cpu_backends() -> list[str]:
    inputs = describe_inputs(*qkv(1, 3, 3, 1, 8, torch.float32)[:3])
    return [b.name for b in BACKENDS.backends if not b.not_supported_reasons(inputs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["softvq", "sdpa", "math"])
def test_gradients_through_every_backend(backend, dtype):
    if backend not in _cpu_backends():
        pytest.skip(f"{backend} cannot run here")
    qkv64 = torch.randn(2, 41, 3, 3, 72, dtype=torch.float64)
    grad = torch.randn(2, 41, 3, 72, dtype=torch.float64)
    packed = qkv64.to(dtype).requires_grad_()
    out = attention(*packed.unbind(2), backend=backend)
    (got,) = torch.autograd.grad(out, packed, grad.to(dtype))
    ref_in = packed.detach().double().requires_grad_()
    ref_out, _ = reference(*ref_in.unbind(2))
    (want,) = torch.autograd.grad(ref_out, ref_in, grad)
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert rel_err(got, want) <= TOL[dtype], f"grad rel err {rel_err(got, want):.3g}"


@needs_kernel
def test_opcheck():
    q, k, v = qkv(2, 9, 9, 2, 16, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.softvq_fast.attention_fwd.default, (q, k, v, 0.25))
    out, lse = torch.ops.softvq_fast.attention_fwd(q, k, v, 0.25)
    grad = torch.randn_like(out)
    args = tuple(t.detach() for t in (grad, q, k, v, out, lse)) + (0.25,)
    torch.library.opcheck(torch.ops.softvq_fast.attention_bwd.default, args)


@needs_kernel
def test_double_backward_is_refused():
    q, k, v = qkv(1, 6, 6, 1, 8, torch.float32)
    packed = torch.stack([q, k, v], 2).requires_grad_()
    (grad,) = torch.autograd.grad(attention(*packed.unbind(2), backend="softvq").sum(), packed, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        grad.sum().backward()


@needs_kernel
def test_compiles_without_graph_breaks():
    q, k, v = qkv(2, 11, 11, 2, 16, torch.float32)
    packed = torch.stack([q, k, v], 2).requires_grad_()

    def block(x):
        return attention(*x.unbind(2), backend="softvq").flatten(2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # graph capture, fake kernel, autograd
    got = compiled(packed)
    (grad_got,) = torch.autograd.grad(got, packed)
    want = block(packed)
    (grad_want,) = torch.autograd.grad(want, packed)
    assert rel_err(got, want) <= 1e-6 and rel_err(grad_got, grad_want) <= 1e-6


OURS = "softvq" if kernel_op_available() else "sdpa"


def _inputs(dtype=torch.float32, kv_len=5, needs_grad=False, device="cpu", head_dim=16) -> AttentionInputs:
    return AttentionInputs(torch.device(device), dtype, needs_grad, 1, 2, 5, kv_len, head_dim, True)


def _auto(dtype=torch.float32, kv_len=5, needs_grad=False) -> str:
    return BACKENDS.select(_inputs(dtype, kv_len, needs_grad)).name


def test_auto_order_on_the_measured_xeon_with_amx(machine, monkeypatch):
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine("GenuineIntel", "AVX512+AMX", 2)
    windows = cpu_rules.cpu_rule("attention").windows
    fp32_max, bf16_max = windows[(torch.float32, False)]["kv_len"][1], windows[(torch.bfloat16, False)]["kv_len"][1]
    assert (fp32_max, bf16_max) == (1200, 32)
    assert _auto() == OURS
    for sdpa_faster in (dict(kv_len=fp32_max + 1), dict(dtype=torch.bfloat16, kv_len=bf16_max + 1)):
        assert _auto(**sdpa_faster) == "sdpa"
    assert _auto(torch.bfloat16, bf16_max) == OURS
    assert _auto(needs_grad=True) == "sdpa"  # 5 keys: SDPA trains faster
    training_min = windows[(torch.float32, True)]["kv_len"][0]
    assert training_min == 64 and _auto(kv_len=64, needs_grad=True) == OURS
    assert _auto(torch.bfloat16, 64, needs_grad=True) == "sdpa"
    assert _auto(kv_len=fp32_max + 1, needs_grad=True) == "sdpa"


def test_auto_order_on_the_measured_zen4(machine, monkeypatch):
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine("AuthenticAMD", "AVX512", 2)
    for dtype in (torch.float32, torch.bfloat16):
        for kv_len in (1, 5, 64, 1089, 4096):
            assert _auto(dtype, kv_len) == OURS and _auto(dtype, kv_len, needs_grad=True) == OURS
    # our CPU kernel has no float16
    assert _auto(torch.float16) == "sdpa" and _auto(torch.float16, needs_grad=True) == "sdpa"


@pytest.mark.parametrize(
    "vendor, isa, threads",
    [
        ("AuthenticAMD", "AVX512", 1),  # the measured CPU at other thread counts
        ("AuthenticAMD", "AVX512", 4),
        ("GenuineIntel", "AVX512+AMX", 8),
        ("GenuineIntel", "AVX512", 2),  # AVX-512 without AMX on Intel (Skylake to Ice Lake): not measured
        ("AuthenticAMD", "AVX2", 2),  # AVX2 was only emulated on the Zen 4: not measured
        ("GenuineIntel", "AVX2", 2),
        ("", "SVE256", 2),
        ("", "DEFAULT", 2),
    ],
)
def test_machines_not_measured_put_sdpa_first(machine, monkeypatch, vendor, isa, threads):
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine(vendor, isa, threads)
    rule = cpu_rules.cpu_rule("attention")
    assert rule.windows == {} and rule.source.startswith("not measured")
    for dtype in (torch.float32, torch.bfloat16):
        for kv_len in (5, 64, 1089):
            assert _auto(dtype, kv_len) == "sdpa" and _auto(dtype, kv_len, needs_grad=True) == "sdpa"


@needs_kernel
def test_choice_follows_set_num_threads(machine, monkeypatch):
    """The thread count is read at call time: on the measured Zen 4 ours runs at 2 threads and
    SDPA at 1, in one process, through the remembered choices."""
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine("AuthenticAMD", "AVX512", 2)
    calls = _record_calls(monkeypatch, ("softvq", "sdpa"))
    q, k, v = qkv(1, 7, 7, 2, 16, torch.float32)
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        attention(q, k, v)
    assert calls == ["softvq", "sdpa", "softvq"]


def _record_calls(monkeypatch, names) -> list[str]:
    calls = []
    for name in names:
        backend = BACKENDS.get(name)
        monkeypatch.setattr(backend, "fn", lambda *a, _name=name, _fn=backend.fn: calls.append(_name) or _fn(*a))
    return calls


def test_cuda_order_prefers_flash_attn_then_sdpa_and_never_picks_softvq(monkeypatch):
    """Our CUDA kernel has never run on a GPU: `auto` leaves it out; it runs only by name."""
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    monkeypatch.setattr(backends, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(backends, "cuda_capability", lambda index: (9, 0))
    for needs_grad in (False, True):
        inputs = _inputs(torch.bfloat16, 64, needs_grad, device="cuda", head_dim=64)
        assert list(BACKENDS.priority(inputs)) == ["flash_attn", "sdpa", "xformers", "math"]
        monkeypatch.setattr(BACKENDS.get("flash_attn"), "package_problem", "package flash_attn is not installed")
        assert BACKENDS.select(inputs).name == "sdpa"
        monkeypatch.setattr(BACKENDS.get("flash_attn"), "package_problem", None)
        assert BACKENDS.select(inputs).name == "flash_attn"
        if kernel_op_available():
            assert BACKENDS.select(inputs, "softvq").name == "softvq"
            monkeypatch.setenv(BACKENDS.env_var, "softvq")
            assert BACKENDS.select(inputs).name == "softvq"
            monkeypatch.delenv(BACKENDS.env_var)


def test_environment_override(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_ATTENTION", raising=False)
    monkeypatch.setenv("SOFTVQ_FAST_ATTENTION_BACKEND", "math")
    assert BACKENDS.env_var == "SOFTVQ_FAST_ATTENTION_BACKEND"
    assert BACKENDS.select(_inputs()).name == "math" and BACKENDS.select(_inputs(needs_grad=True)).name == "math"
    assert BACKENDS.select(_inputs(), "sdpa").name == "sdpa"  # the argument wins over the variable


def test_the_old_environment_variable_still_works_with_a_warning(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_ATTENTION_BACKEND", raising=False)
    monkeypatch.setenv("SOFTVQ_FAST_ATTENTION", "math")
    calls = _record_calls(monkeypatch, ("math",))
    with pytest.warns(FutureWarning, match="SOFTVQ_FAST_ATTENTION is deprecated; set SOFTVQ_FAST_ATTENTION_BACKEND"):
        attention(*qkv(1, 7, 7, 2, 16, torch.float32))
    assert calls == ["math"]
    monkeypatch.setenv("SOFTVQ_FAST_ATTENTION_BACKEND", "sdpa")  # the new name wins
    assert BACKENDS.select(_inputs()).name == "sdpa"


def test_choice_follows_the_environment_between_calls(monkeypatch):
    # attention() remembers its choices per input description: the override must still apply.
    calls = _record_calls(monkeypatch, ("math", "sdpa"))
    q, k, v = qkv(1, 7, 7, 2, 16, torch.float32)
    for name in ("math", "sdpa", "math"):
        monkeypatch.setenv("SOFTVQ_FAST_ATTENTION_BACKEND", name)
        attention(q, k, v)
    assert calls == ["math", "sdpa", "math"]


def test_a_package_that_fails_to_import_is_an_unavailable_backend(tmp_path, monkeypatch):
    (tmp_path / "broken_attention_pkg").mkdir()
    (tmp_path / "broken_attention_pkg" / "__init__.py").write_text("raise ImportError('built for another torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert backends.package_problem("broken_attention_pkg") == (
        "package broken_attention_pkg is installed but fails to import (ImportError: built for another torch)"
    )
    assert backends.package_problem("no_such_attention_pkg") == "package no_such_attention_pkg is not installed"
    assert backends.package_problem("json") is None


def test_cuda_kernels_refuse_gpus_before_ampere(monkeypatch):
    """Without a GPU: an sm_75 GPU (no bf16 mma.sync) is a reason, an sm_90 one is not."""
    monkeypatch.setattr(backends, "extension_has_cuda", lambda: True)
    inputs = AttentionInputs(torch.device("cuda", 0), torch.float16, False, 2, 4, 64, 64, 64, True)
    softvq = BACKENDS.get("softvq")
    monkeypatch.setattr(backends, "cuda_capability", lambda index: (7, 5))
    assert softvq.input_reasons(inputs) == [
        "cuda kernels need compute capability >= 8.0 (bf16/fp16 mma.sync), this GPU has 7.5"
    ]
    monkeypatch.setattr(backends, "cuda_capability", lambda index: (9, 0))
    assert softvq.input_reasons(inputs) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_keys_give_zeros_and_auto_falls_back(machine, monkeypatch, dtype):
    """No keys: the empty sum, zeros, with zero gradients, from every backend that accepts them;
    `softvq` declares the reason and `auto` (ours first on the measured Zen 4) falls back to
    SDPA. (auto used to raise the kernel's error.)"""
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    machine("AuthenticAMD", "AVX512", 2)
    q = torch.randn(2, 5, 3, 16).to(dtype).requires_grad_()
    k = v = torch.randn(2, 0, 3, 16).to(dtype)
    calls = _record_calls(monkeypatch, ("sdpa",))
    for backend in ("auto", "sdpa", "math"):
        out = attention(q, k, v, backend=backend)
        (grad,) = torch.autograd.grad(out.sum(), q)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))
    assert calls == ["sdpa", "sdpa"]
    with pytest.raises(NoBackendError, match=r"'softvq' \(requested\).*no keys \(kv length 0\)"):
        attention(q, k, v, backend="softvq")
    cuda = _inputs(torch.bfloat16, 0, device="cuda", head_dim=64)
    assert {b.name: b.input_reasons(cuda) for b in BACKENDS.backends if b.name != "softvq"} == {
        "flash_attn": ["no keys (kv length 0)"], "xformers": ["no keys (kv length 0)"],
        "sdpa": ["no keys (kv length 0): zeros from sdpa are tested on the cpu only"], "math": [],
    }


@pytest.mark.parametrize("backend", ["auto", "softvq", "sdpa", "math"])
def test_head_dim_zero_names_head_dim(backend):
    """Used to raise ZeroDivisionError (1/sqrt(0)) on every backend."""
    q = torch.randn(1, 4, 2, 0)
    with pytest.raises(ValueError, match=r"head_dim \(the last dimension of q, k, v\) must be at least 1"):
        attention(q, q, q, backend=backend)
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, q, q, scale=1.0, backend=backend)


@pytest.mark.parametrize(
    "scale, error, message",
    [
        (True, TypeError, "scale must be a real number .float. or None, got bool"),
        ("0.5", TypeError, "scale must be a real number .float. or None, got str"),
        (torch.tensor(0.5), TypeError, r"got Tensor \(a tensor scale would get no gradient"),
        (float("nan"), ValueError, "scale must be finite, got nan"),
        (float("inf"), ValueError, "scale must be finite, got inf"),
    ],
)
def test_bad_scale_names_scale(scale, error, message):
    q, k, v = qkv(1, 5, 5, 2, 16, torch.float32)
    with pytest.raises(error, match=message):
        attention(q, k, v, scale=scale)


def test_scale_accepts_ints_and_numpy_numbers():
    numpy = pytest.importorskip("numpy")
    q, k, v = qkv(1, 5, 5, 2, 16, torch.float32)
    want = attention(q, k, v, scale=0.5, backend="math")
    assert torch.equal(attention(q, k, v, scale=numpy.float32(0.5), backend="math"), want)
    assert torch.equal(attention(q, k, v, scale=1, backend="math"), attention(q, k, v, scale=1.0, backend="math"))


def test_explicit_backend_that_cannot_run_lists_reasons():
    q, k, v = qkv(1, 5, 5, 2, 16, torch.float64)
    with pytest.raises(NoBackendError, match=r"'flash_attn'.*device cpu not supported"):
        attention(q, k, v, backend="flash_attn")
    with pytest.raises(NoBackendError, match=r"'softvq'.*float64"):
        attention(q, k, v, backend="softvq")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        attention(q, k, v, backend="nope")


def test_bad_inputs_name_the_argument():
    q, k, v = qkv(1, 5, 5, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"q must be 4-D \(batch, seq, heads, head_dim\)"):
        attention(q.flatten(2), k, v)
    with pytest.raises(ValueError, match=r"k and v must be \(B, Sk, H, D\)"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="attention: v must be a torch.Tensor, got list"):
        attention(q, k, v.tolist())
    with pytest.raises(ValueError, match="q, k, v must be floating point .* got torch.int64"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="q, k, v must be on one device, got cpu, meta, cpu"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"k must be 4-D .* got shape \(5, 2, 16\)"):
        attention(q, k[0], v)


@needs_kernel
@pytest.mark.parametrize("shape", [(0, 5, 5, 2, 16), (2, 0, 5, 2, 16), (2, 5, 5, 0, 16)], ids=["batch0", "q0", "heads0"])
def test_empty_inputs_give_empty_outputs(shape):
    q, k, v = qkv(*shape, torch.float32)
    out, lse = torch.ops.softvq_fast.attention_fwd(q, k, v, 1.0)
    assert out.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])


@needs_kernel
def test_kernel_op_checks_shapes():
    q, k, v = qkv(1, 5, 5, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="does not match q shape"):
        torch.ops.softvq_fast.attention_fwd(q, k[:, :, :1], v[:, :, :1], 1.0)
    with pytest.raises(RuntimeError, match="dtype must be float32 or bfloat16"):
        torch.ops.softvq_fast.attention_fwd(q.double(), k.double(), v.double(), 1.0)


def test_extension_loads_and_registers_kernels():
    """Imports without a GPU; when built with CUDA the CUDA kernel is registered too."""
    if not extension_available():
        pytest.skip("built without the extension (SOFTVQ_FAST_NO_EXTENSION=1)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("softvq_fast::attention_fwd", "CPU")
    if extension_has_cuda():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("softvq_fast::attention_fwd", "CUDA")


@pytest.mark.parametrize(
    "args, message",
    [((64, 0), "Attention: num_heads must be a positive int, got 0"),
     ((64, 2.0), "Attention: num_heads must be a positive int, got 2.0"),
     ((0, 2), "Attention: dim must be a positive int, got 0"),
     ((64, 3), "Attention: dim=64 must be divisible by num_heads=3")],
)
def test_attention_module_checks_its_arguments(args, message):
    """num_heads=0 used to raise ZeroDivisionError; a float head count or dim 0 built a module."""
    from softvq_fast.nn.transformer import Attention

    with pytest.raises(ValueError, match=message):
        Attention(*args)


def test_attention_module_names_the_input_shape():
    from softvq_fast.nn.transformer import Attention

    module = Attention(64, 4)
    with pytest.raises(ValueError, match=r"Attention: x must be a tensor of shape \(B, S, 64\), got shape \(5, 64\)"):
        module(torch.randn(5, 64))  # used to fail with "too many values to unpack"
    with pytest.raises(ValueError, match=r"got list"):
        module([[0.0] * 64])
    with pytest.raises(ValueError, match=r"linear: x must be \(\.\.\., in_features=64\)"):
        module(torch.randn(2, 5, 32))
