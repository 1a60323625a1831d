"""The generators' training objectives as in the authors' code, per sample: flow matching for SiT
(v-prediction) and 1000-step DDPM for DiT (noise MSE plus the variational bound of the learned
variance), with the label drop of classifier-free guidance.

Inputs follow AdaLNTransformer: x (B, T, C) token sequences (channels last) or (B, C, H, W)
latents (channels first), y (B,) integer labels. Draws (times, noise, label drop) are taken in
that order. With `generator` every draw comes from it, on its device, then moves to x's device:
a step is reproducible from the generator's state alone. Without it the draws follow the
authors' training scripts: SiT times from the CPU's default generator, DiT steps and the noise
from the default generator of x's device, and the label drop inside the model (its train mode).
Explicit `t`, `noise` and `label_drop` replace the corresponding draws.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from softvq_fast.models.adaln_transformer import AdaLNTransformer
from softvq_fast.sampling.diffusion import NOISE_SCHEDULES, TRAIN_STEPS, GaussianDiffusion
from softvq_fast.sampling.flow import PATHS, path_coefficients
from softvq_fast.training.diffusion import mean_over_samples, variational_bound_bits

FLOW_WEIGHTINGS = ("uniform", "lognormal")
# model(x_t, t, y) or, with an explicit or generated label drop, model(x_t, t, y, label_drop=mask).
Model = Callable[..., torch.Tensor]


def flow_matching_times(
    batch: int, *, path: str = "linear", weighting: str = "lognormal", generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch,) float32 times in [0, 1] on the generator's device (the CPU without one).
    uniform: t ~ U[0, 1) (no clamp at either end). lognormal: sigma = exp(n), n ~ N(0, 1), and
    t = sigma / (1 + sigma) on the linear path, (2 / pi) atan(sigma) on the cosine one."""
    _check_choice("path", path, PATHS)
    _check_choice("weighting", weighting, FLOW_WEIGHTINGS)
    device = generator.device if generator is not None else "cpu"
    if weighting == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    sigma = torch.randn(batch, generator=generator, device=device).exp()
    return sigma / (1 + sigma) if path == "linear" else (2 / math.pi) * torch.atan(sigma)


def label_drop_mask(
    batch: int, prob: float, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """(batch,) bool, True with probability `prob`: rand < prob, from `generator` on its device, or
    from the default generator of `device` (the CPU by default)."""
    if generator is not None:
        device = generator.device
    return torch.rand(batch, generator=generator, device=device) < prob


def flow_matching_loss(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    path: str = "linear",
    weighting: str = "lognormal",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    label_drop: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample (B,) flow-matching loss of a velocity model `model(x_t, t, y) -> v`.

    x_t = alpha_t x + sigma_t noise with (linear) alpha = 1 - t, sigma = t or (cosine)
    alpha = cos(pi t / 2), sigma = sin(pi t / 2); the target is d alpha/dt x + d sigma/dt noise
    (noise - x on the linear path); loss = mean over non-batch dimensions of (v - target)^2.
    t (B,) (default: `flow_matching_times(B, path=path, weighting=weighting)`) is cast to x's
    dtype and given to the model unscaled; noise (default N(0, 1)) has x's shape. `label_drop`
    (B,) bool is passed to the model as its label_drop (see the module docstring for the draws)."""
    _check_choice("path", path, PATHS)
    _check_choice("weighting", weighting, FLOW_WEIGHTINGS)
    batch = x.shape[0]
    if t is None:
        t = flow_matching_times(batch, path=path, weighting=weighting, generator=generator)
    else:
        _check_batch_vector("t", t, batch, floating=True)
    t = t.to(device=x.device, dtype=x.dtype)
    noise = _noise(x, noise, generator)
    label_drop = _label_drop(model, label_drop, batch, generator, x.device)
    alpha, sigma, d_alpha, d_sigma = path_coefficients(path, t.reshape(batch, *([1] * (x.ndim - 1))))
    x_t = alpha * x + sigma * noise
    target = d_alpha * x + d_sigma * noise
    velocity = _call(model, x_t, t, y, label_drop)
    if velocity.shape != x.shape:
        raise ValueError(f"the model returned {tuple(velocity.shape)}; a velocity must have x's shape {tuple(x.shape)}")
    return mean_over_samples((velocity - target) ** 2)


def diffusion_loss(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise_schedule: str = "linear",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    label_drop: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_train_steps: int = TRAIN_STEPS,
) -> torch.Tensor:
    """Per-sample (B,) DDPM training loss of a noise model `model(x_t, t, y)` (DiT).

    t (B,) integer steps in [0, num_train_steps) (default: uniform), noise (default N(0, 1)) of
    x's shape, x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise on the named beta schedule
    ("linear" or "cosine", see softvq_fast.sampling.diffusion). The model output has x's shape
    (the predicted noise eps: loss = mse) or twice its channels (eps, then the variance logits
    of a learned sigma: loss = mse + vb), where mse = mean over non-batch dimensions of
    (eps - noise)^2 and vb = `variational_bound_bits` with eps detached, so the bound trains
    only the variance. `label_drop` as in flow_matching_loss."""
    _check_choice("noise_schedule", noise_schedule, NOISE_SCHEDULES)
    schedule = _diffusion_schedule(noise_schedule, num_train_steps, x.device)
    batch = x.shape[0]
    if t is None:
        device = generator.device if generator is not None else x.device
        t = torch.randint(0, num_train_steps, (batch,), generator=generator, device=device)
    else:
        _check_batch_vector("t", t, batch, floating=False)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_train_steps):
            raise ValueError(f"t must hold steps in [0, {num_train_steps}), got values in [{int(t.min())}, {int(t.max())}]")
    t = t.to(x.device)
    noise = _noise(x, noise, generator)
    label_drop = _label_drop(model, label_drop, batch, generator, x.device)
    x_t = schedule.q_sample(x, noise, t)
    output = _call(model, x_t, t, y, label_drop)
    channel_dim = -1 if x.ndim == 3 else 1
    channels = x.shape[channel_dim]
    learned_shape = list(x.shape)
    learned_shape[channel_dim] = 2 * channels
    if output.shape == x.shape:
        return mean_over_samples((noise - output) ** 2)
    if list(output.shape) != learned_shape:
        raise ValueError(
            f"the model returned {tuple(output.shape)}; expected x's shape {tuple(x.shape)} (noise) or "
            f"{tuple(learned_shape)} (noise and variance logits)"
        )
    eps, variance_logits = output.split(channels, dim=channel_dim)
    mse = mean_over_samples((noise - eps) ** 2)
    return mse + variational_bound_bits(schedule, x, x_t, t, eps.detach(), variance_logits)


@functools.lru_cache(maxsize=None)
def _diffusion_schedule(noise_schedule: str, num_train_steps: int, device: torch.device) -> GaussianDiffusion:
    return GaussianDiffusion(num_train_steps, num_train_steps=num_train_steps, noise_schedule=noise_schedule).to(device)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _check_batch_vector(name: str, value: torch.Tensor, batch: int, *, floating: bool) -> None:
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) like x's batch, got {tuple(value.shape)}")
    if value.is_floating_point() != floating:
        kind = "floating-point times" if floating else "integer steps"
        raise ValueError(f"{name} must hold {kind}, got {value.dtype}")


def _noise(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if noise is None:
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def _inner_model(model: Model) -> Model:
    """The model inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def _label_drop(
    model: Model, label_drop: torch.Tensor | None, batch: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """The explicit mask, else one drawn from `generator` for one of our generators in train mode
    (probability: its class_dropout_prob), else None (the model draws, or nothing is dropped)."""
    if label_drop is not None:
        return label_drop.to(device)
    if generator is None:
        return None
    inner = _inner_model(model)
    if not isinstance(inner, AdaLNTransformer) or not inner.training or inner.y_embedder.dropout_prob <= 0:
        return None
    return label_drop_mask(batch, inner.y_embedder.dropout_prob, generator=generator).to(device)


def _call(model: Model, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, label_drop: torch.Tensor | None) -> torch.Tensor:
    if label_drop is None:
        return model(x_t, t, y)
    return model(x_t, t, y, label_drop=label_drop)
