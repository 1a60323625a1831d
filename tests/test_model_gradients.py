"""Gradients of the training objectives of the tiny sharp SiT, DiT and tokenizer
(support.sharp_models) w.r.t. every parameter and the input, on every backend combination that
runs with gradients, against the same model in float64 with every op from the math
(support.model_gradients.exact_evaluation); and the backward mutants those checks must catch.

Objectives, with fixed draws: SiT flow_matching_loss and DiT diffusion_loss (learned variance,
steps in [1, 999]: the decoder NLL at step 0 is ill-conditioned in float32) with explicit t, noise
and label_drop, averaged over the batch; the tokenizer's training_forward with its reconstruction
MSE alone ("reconstruction") and plus 0.01 x the entropy regulariser ("objective"). The errors are
‖g − g64‖ / ‖g64‖ of all parameter gradients concatenated ("parameters") and of the input's.

The models are support.sharp_models' tiny ones as they are: the tokenizer's soft-VQ runs at tau
0.5 on L2-normalised codes, where float32 keeps the z_q path accurate (at the authors' 0.07 the
peaked softmax costs it digits); its entropy term runs at the fixed temperature 0.01 (see
TOKENIZER_OBJECTIVE_FP32_TOL).

The inputs are drawn once per module (seeded from the module's id: the float64 evaluation is
computed once); the errors are printed (pytest -s) for the tables of the commits.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

from softvq_fast.dispatch import NoBackendError
from softvq_fast.models import DiT, SiT
from softvq_fast.training import diffusion_loss, flow_matching_loss
from softvq_fast.training.tokenizer_losses import reconstruction_loss
from support.model_gradients import (Gradients, backward_mutant_cases, exact_evaluation, gradient_errors, gradients,
                                     inject_backward_mutant)
from support.numerics import seed_for
from support.sharp_models import (CPU_BACKENDS, CUDA_BACKENDS, FP32_TOL, device_backends, float64_copy, report,
                                  tiny_generator, tiny_tokenizer)
from support.tokenizer_training import training_forward_float64

ENTROPY_WEIGHT = 0.01
# The entropy regulariser is a softmax of the cosine logits at temperature 0.01: it multiplies the
# float32 forward error of the encoder's output by up to 100, so the objective's float32
# gradient is as far from float64 with plain PyTorch (math attention, reference soft-VQ, torch
# linear layers) as with our kernels, and further than FP32_TOL; the reconstruction term alone
# stays within FP32_TOL. (The errors and the mutants' are in the commit that set this bound.)
TOKENIZER_OBJECTIVE_FP32_TOL = 2e-4
# bf16 autocast gradients through sharp attention. Under autocast the tokenizer's entropy term is
# not compared: bf16 rounding of the encoder's output, times 100, leaves it few correct digits.
BF16_GRAD_TOL = 6e-2
# Backward mutants also run under bf16 autocast where that check separates them from bf16
# rounding: attention (its bf16 backward is a kernel of its own) and LayerNorm-modulate. The
# linear and soft-VQ mutants touch a few tensors of the concatenated vector (the biases, the
# codebook): the float32 check catches them, bf16 rounding would hide them.
BF16_MUTANT_OPS = ("attention", "layernorm_modulate")
LINEAR_BACKENDS = ("auto", "torch", "onednn")
FAMILIES = {"sit": SiT, "dit": DiT}
BATCH = 3

# (model, input, bf16 autocast) -> {loss name: scalar}
Losses = Callable[[nn.Module, torch.Tensor, bool], dict[str, torch.Tensor]]


@dataclass
class Case:
    """A float32 model, its input, its losses, their float64 gradients and the bound of each loss
    checked at each precision ("float32", "autocast"), all by loss name."""

    model: nn.Module
    x: torch.Tensor
    losses: Losses
    expected: dict[str, Gradients]
    bounds: dict[str, dict[str, float]]


def _generator_case(family: str, seed: int) -> Case:
    model = tiny_generator(FAMILIES[family])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *model.latent_shape, generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    y = torch.randint(0, model.y_embedder.num_classes, (BATCH,), generator=generator)
    drop = torch.tensor([False, True, False])  # one sample on the null class
    if family == "sit":
        t = torch.rand(BATCH, generator=generator)
    else:
        t = torch.randint(1, 1000, (BATCH,), generator=generator)

    def losses(m: nn.Module, x: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
        # The objectives move t, noise and label_drop to x's device and dtype.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            if family == "sit":
                per_sample = flow_matching_loss(m, x, y.to(x.device), t=t, noise=noise, label_drop=drop)
            else:
                per_sample = diffusion_loss(m, x, y.to(x.device), t=t, noise=noise, label_drop=drop)
        return {"objective": per_sample.mean()}

    with exact_evaluation():
        expected = gradients(float64_copy(model), functools.partial(losses, autocast=False), x.double())
    bounds = {"float32": {"objective": FP32_TOL}, "autocast": {"objective": BF16_GRAD_TOL}}
    return Case(model, x, losses, expected, bounds)


def _tokenizer_case(seed: int) -> Case:
    model = tiny_tokenizer()
    size = model.config.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def losses(m: nn.Module, x: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
        out = m.training_forward(x, autocast_dtype=torch.bfloat16 if autocast else None)
        reconstruction = reconstruction_loss(x, out.reconstructions)
        return {"reconstruction": reconstruction, "objective": reconstruction + ENTROPY_WEIGHT * out.entropy_loss}

    def losses64(m: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = training_forward_float64(m, x)
        reconstruction = reconstruction_loss(x, out["reconstructions"])
        return {"reconstruction": reconstruction, "objective": reconstruction + ENTROPY_WEIGHT * out["entropy"]}

    with exact_evaluation():
        expected = gradients(float64_copy(model), losses64, images.double())
    bounds = {"float32": {"reconstruction": FP32_TOL, "objective": TOKENIZER_OBJECTIVE_FP32_TOL},
              "autocast": {"reconstruction": BF16_GRAD_TOL}}
    return Case(model, images, losses, expected, bounds)


@pytest.fixture(scope="module")
def cases(request) -> dict[str, Case]:
    """{"sit", "dit", "tokenizer": Case}, inputs seeded from the module's id and the name."""
    seeds = {name: seed_for(f"{request.node.nodeid}::{name}") for name in ("sit", "dit", "tokenizer")}
    return {"tokenizer": _tokenizer_case(seeds["tokenizer"]),
            **{family: _generator_case(family, seeds[family]) for family in FAMILIES}}


@contextlib.contextmanager
def _skip_where_backends_cannot_run(backends: dict[str, str]) -> Iterator[None]:
    try:
        yield
    except NoBackendError as exc:
        pytest.skip(f"backends {backends} cannot run these inputs with gradients here: {exc}")


def gradient_check(case: Case, precision: str, device: str = "cpu", backends: dict[str, str] | None = None) -> dict[str, float]:
    """Errors of each loss's gradients (a copy of the model on `device` with `backends`, in float32 or
    under bf16 autocast) against the float64 evaluation, by "<loss> <parameters|input>"."""
    model = copy.deepcopy(case.model).to(device)
    model.set_backends(**(backends or {}))
    losses = functools.partial(case.losses, autocast=precision == "autocast")
    with _skip_where_backends_cannot_run(backends or {}):
        got = gradients(model, losses, case.x.to(device), tuple(case.bounds[precision]))
    return {f"{name} {kind}": value for name, grads in got.items()
            for kind, value in gradient_errors(grads, case.expected[name]).items()}


def failures(case: Case, precision: str, errors: dict[str, float]) -> dict[str, float]:
    """The errors above their loss's bound."""
    bounds = case.bounds[precision]
    return {key: value for key, value in errors.items() if not value <= bounds[key.split()[0]]}


def _backend_combinations() -> list:
    """pytest parameters (family, device, backends): on the CPU every attention x linear backend (and
    the tokenizer's soft-VQ backends), on CUDA every attention x fused-op backend (marked cuda)."""
    params = []
    for family in ("sit", "dit", "tokenizer"):
        fused = "soft_vq" if family == "tokenizer" else "layernorm_modulate"
        for device, attentions, linears, fused_backends, marks in (
            ("cpu", CPU_BACKENDS, LINEAR_BACKENDS, ("cpu", "reference") if family == "tokenizer" else ("reference",), ()),
            ("cuda", CUDA_BACKENDS, ("auto",), ("triton", "reference"), (pytest.mark.cuda,)),
        ):
            for attention in attentions:
                for linear in linears:
                    for other in fused_backends:
                        backends = {"attention": attention, "linear": linear, fused: other}
                        params.append(pytest.param(family, device, backends, marks=marks,
                                                   id=f"{family}-{device}-{attention}-linear_{linear}-{fused}_{other}"))
    return params


@pytest.mark.parametrize("family, device, backends", _backend_combinations())
def test_float32_gradients_match_float64(cases, family, device, backends):
    errors = gradient_check(cases[family], "float32", device, backends)
    report(f"{family} {device} float32 {backends}", errors)
    assert not failures(cases[family], "float32", errors), errors


@pytest.mark.parametrize("device, attention", device_backends())
@pytest.mark.parametrize("family", ["sit", "dit", "tokenizer"])
def test_bf16_autocast_gradients_match_float64(cases, family, device, attention):
    errors = gradient_check(cases[family], "autocast", device, {"attention": attention})
    report(f"{family} {device} autocast {attention}", errors)
    assert not failures(cases[family], "autocast", errors), errors


def _mutant_cases() -> list:
    """pytest parameters (family, op, bug, precision, device) of every backward mutant of the ops each
    model calls, in float32 and (BF16_MUTANT_OPS) under bf16 autocast, on the CPU and on CUDA."""
    ops = {"sit": ("attention", "linear", "layernorm_modulate"), "dit": ("attention", "linear", "layernorm_modulate"),
           "tokenizer": ("attention", "linear", "soft_vq")}
    params = []
    for family, family_ops in ops.items():
        for op, bug in backward_mutant_cases(family_ops):
            for precision in ("float32", "autocast") if op in BF16_MUTANT_OPS else ("float32",):
                for device, marks in (("cpu", ()), ("cuda", (pytest.mark.cuda,))):
                    params.append(pytest.param(family, op, bug, precision, device, marks=marks,
                                               id=f"{family}-{op}-{bug}-{precision}-{device}"))
    return params


@pytest.mark.parametrize("family, op, bug, precision, device", _mutant_cases())
def test_gradient_check_catches_backward_mutants(cases, family, op, bug, precision, device, monkeypatch):
    """Each mutant fails the gradient check; its bug-free twin ("none": the same hand-written
    backward) passes it."""
    inject_backward_mutant(monkeypatch, op, bug)
    errors = gradient_check(cases[family], precision, device)
    report(f"{family} {device} {precision} {op} mutant {bug}", errors)
    if bug == "none":
        assert not failures(cases[family], precision, errors), errors
    else:
        assert failures(cases[family], precision, errors), errors
