"""softvq_fast.attention: kernels against float64, gradients through every backend, dispatch."""
from __future__ import annotations

import pytest
import torch

from support.attention_cases import poison, qkv, reference, reference_grads
from support.numerics import rel_err
from softvq_fast._extension import extension_available, extension_has_cuda
from softvq_fast.dispatch import NoBackendError
from softvq_fast.ops import attention as attention_module
from softvq_fast.ops.attention import (
    AMX_CPU_RULES,
    AVX2_CPU_RULES,
    AVX512_CPU_RULES,
    UNMEASURED_CPU_RULES,
    OPS,
    TRAINING_OPS,
    _describe,
    _kernel_op_available,
    _ops_for,
    attention,
    detect_cpu_order_rules,
)

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
    inputs = _describe(*qkv(1, 3, 3, 1, 8, torch.float32)[:3])
    return [b.name for b in OPS.backends if not b.not_supported_reasons(inputs)]


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


def _auto_choice(inputs, needs_grad: bool) -> str:
    return _ops_for(inputs, needs_grad).select(inputs).name


def test_auto_order_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(attention_module, "CPU_ORDER_RULES", AMX_CPU_RULES)
    inputs = _describe(*qkv(1, 5, 5, 2, 16, torch.float32)[:3])
    ours = "softvq" if _kernel_op_available() else "sdpa"
    fp32_max, bf16_max = AMX_CPU_RULES.forward_max_len[torch.float32], AMX_CPU_RULES.forward_max_len[torch.bfloat16]
    assert _auto_choice(inputs, needs_grad=False) == ours
    long_inputs = inputs._replace(kv_len=fp32_max + 1)
    long_bf16 = inputs._replace(dtype=torch.bfloat16, kv_len=bf16_max + 1)
    for sdpa_faster in (long_inputs, long_bf16):
        assert _auto_choice(sdpa_faster, needs_grad=False) == "sdpa"
    assert _auto_choice(long_bf16._replace(kv_len=bf16_max), needs_grad=False) == ours
    assert _auto_choice(inputs, needs_grad=True) == "sdpa"  # 5 keys: SDPA trains faster
    training = inputs._replace(kv_len=AMX_CPU_RULES.training_lengths[torch.float32][0])
    assert _auto_choice(training, needs_grad=True) == ours
    assert _auto_choice(training._replace(dtype=torch.bfloat16), needs_grad=True) == "sdpa"
    assert _auto_choice(long_inputs, needs_grad=True) == "sdpa"


def test_auto_order_on_a_cpu_with_avx512_and_no_amx(monkeypatch):
    monkeypatch.setattr(attention_module, "CPU_ORDER_RULES", AVX512_CPU_RULES)
    ours = "softvq" if _kernel_op_available() else "sdpa"
    for dtype in (torch.float32, torch.bfloat16):
        for kv_len in (1, 5, 64, 1089, 4096):
            inputs = _describe(*qkv(1, 5, 5, 2, 16, dtype)[:3])._replace(kv_len=kv_len)
            assert _auto_choice(inputs, needs_grad=False) == ours
            assert _auto_choice(inputs, needs_grad=True) == ours
    fp16 = _describe(*qkv(1, 5, 5, 2, 16, torch.float16)[:3])  # our CPU kernel has no fp16
    assert _auto_choice(fp16, needs_grad=False) == "sdpa" and _auto_choice(fp16, needs_grad=True) == "sdpa"


def test_auto_order_on_a_cpu_with_avx2_only(monkeypatch):
    monkeypatch.setattr(attention_module, "CPU_ORDER_RULES", AVX2_CPU_RULES)
    ours = "softvq" if _kernel_op_available() else "sdpa"
    fp32 = _describe(*qkv(1, 5, 5, 2, 16, torch.float32)[:3])
    bf16 = fp32._replace(dtype=torch.bfloat16)
    expected = {  # (inputs, needs_grad) -> backend
        (fp32._replace(kv_len=1200), False): ours, (fp32._replace(kv_len=1201), False): "sdpa",
        (fp32._replace(kv_len=32), True): ours, (fp32._replace(kv_len=2048), True): "sdpa",
        (bf16._replace(kv_len=1089), False): ours, (bf16._replace(kv_len=1089), True): ours,
        (bf16._replace(kv_len=4096), False): "sdpa",
    }
    assert {key: _auto_choice(*key) for key in expected} == expected


def test_unmeasured_cpus_put_sdpa_first(monkeypatch):
    monkeypatch.setattr(attention_module, "CPU_ORDER_RULES", UNMEASURED_CPU_RULES)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = _describe(*qkv(1, 5, 5, 2, 16, dtype)[:3])
        assert _auto_choice(inputs, needs_grad=False) == "sdpa" and _auto_choice(inputs, needs_grad=True) == "sdpa"


@pytest.mark.parametrize(
    "has_amx, capability, rules",
    [(True, "AVX512", AMX_CPU_RULES), (False, "AVX512", AVX512_CPU_RULES), (False, "AVX2", AVX2_CPU_RULES),
     (False, "DEFAULT", UNMEASURED_CPU_RULES), (False, "SVE256", UNMEASURED_CPU_RULES)],
)
def test_cpu_order_rules_follow_the_cpu(monkeypatch, has_amx, capability, rules):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert detect_cpu_order_rules() is rules
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert detect_cpu_order_rules() is (AVX512_CPU_RULES if rules is AMX_CPU_RULES else rules)  # API gone: no AMX


def test_auto_order_and_environment_override(monkeypatch):
    inputs = _describe(*qkv(1, 5, 5, 2, 16, torch.float32)[:3])
    monkeypatch.delenv("SOFTVQ_FAST_ATTENTION", raising=False)
    ours = "softvq" if _kernel_op_available() else "sdpa"
    assert OPS.select(inputs).name == ours  # measured fastest in CPU float32 (module docstring)
    assert [b for b in TRAINING_OPS.auto_order("cuda")][:2] == ["flash_attn", "sdpa"]  # native backwards first
    monkeypatch.setenv("SOFTVQ_FAST_ATTENTION", "math")
    assert OPS.select(inputs).name == "math" and TRAINING_OPS.select(inputs).name == "math"
    assert OPS.select(inputs, "sdpa").name == "sdpa"  # the argument wins over the variable


def test_choice_follows_the_environment_between_calls(monkeypatch):
    # attention() remembers its choices per input description: the override must still apply.
    calls = []
    for name in ("math", "sdpa"):
        backend = OPS.get(name)
        monkeypatch.setattr(backend, "fn", lambda *a, _name=name, _fn=backend.fn: calls.append(_name) or _fn(*a))
    q, k, v = qkv(1, 7, 7, 2, 16, torch.float32)
    for name in ("math", "sdpa", "math"):
        monkeypatch.setenv("SOFTVQ_FAST_ATTENTION", name)
        attention(q, k, v)
    assert calls == ["math", "sdpa", "math"]


def test_a_package_that_fails_to_import_is_an_unavailable_backend(tmp_path, monkeypatch):
    from softvq_fast.ops.attention import _package_problem

    (tmp_path / "broken_attention_pkg").mkdir()
    (tmp_path / "broken_attention_pkg" / "__init__.py").write_text("raise ImportError('built for another torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _package_problem("broken_attention_pkg") == (
        "package broken_attention_pkg is installed but fails to import (ImportError: built for another torch)"
    )
    assert _package_problem("no_such_attention_pkg") == "package no_such_attention_pkg is not installed"
    assert _package_problem("json") is None


def test_cuda_kernels_refuse_gpus_before_ampere(monkeypatch):
    """Without a GPU: an sm_75 GPU (no bf16 mma.sync) is a reason, an sm_90 one is not."""
    import softvq_fast.ops.attention as ops

    monkeypatch.setattr(ops, "extension_has_cuda", lambda: True)
    inputs = ops.AttentionInputs(torch.device("cuda", 0), torch.float16, 2, 4, 64, 64, 64, True)
    softvq = next(b for b in ops.ATTENTION_BACKENDS if b.name == "softvq")
    monkeypatch.setattr(ops, "_cuda_capability", lambda index: (7, 5))
    assert softvq.input_reasons(inputs) == [
        "cuda kernels need compute capability >= 8.0 (bf16/fp16 mma.sync), this GPU has 7.5"
    ]
    monkeypatch.setattr(ops, "_cuda_capability", lambda index: (9, 0))
    assert softvq.input_reasons(inputs) == []


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
