"""DDPM and DDIM sampling for noise-predicting models (DiT), with respaced timesteps and
learned variances.

The base process is DiT's: 1000 steps, betas linear from 1e-4 to 0.02. Respacing keeps `steps`
evenly spaced timesteps of it (rounded, first and last included) and recomputes the betas
between them from the kept cumulative alphas; the model is called with the original timestep
index. With a learned sigma the model's extra channels v in [-1, 1] interpolate the log variance
between the posterior variance (v = -1) and beta (v = 1); without one the variance is
"fixed large" (beta, with the posterior variance at the first step).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from softvq_fast.sampling.flow import progress_iter

NoiseModel = Callable[[torch.Tensor, float], torch.Tensor]
DIFFUSION_SAMPLERS = ("ddpm", "ddim")
TRAIN_STEPS = 1000


def respaced_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """`steps` evenly spaced indices of 0 .. num_train_steps - 1, both ends included."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if steps == 1:
        return [0]
    stride = (num_train_steps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


class GaussianDiffusion:
    """The respaced schedule (float64 tensors on the CPU, indexed by the respaced step)."""

    def __init__(self, steps: int, *, num_train_steps: int = TRAIN_STEPS, learn_sigma: bool = True) -> None:
        base_betas = torch.linspace(1e-4, 0.02, num_train_steps, dtype=torch.float64)
        base_cumprod = torch.cumprod(1 - base_betas, 0)
        self.timestep_map = respaced_timesteps(num_train_steps, steps)
        self.learn_sigma = learn_sigma
        cumprod = base_cumprod[self.timestep_map]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
        self.betas = 1 - cumprod / previous
        self.alphas_cumprod = cumprod
        self.alphas_cumprod_prev = previous
        self.posterior_variance = self.betas * (1 - previous) / (1 - cumprod)
        # The posterior variance is 0 at the first step: clip its log to the second value.
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
        self.posterior_mean_coef1 = self.betas * previous.sqrt() / (1 - cumprod)
        self.posterior_mean_coef2 = (1 - previous) * (1 - self.betas).sqrt() / (1 - cumprod)

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    def split_output(self, output: torch.Tensor, channel_dim: int, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(predicted noise, variance logits or None) from the model output."""
        eps = output.narrow(channel_dim, 0, channels)
        if not self.learn_sigma:
            return eps, None
        return eps, output.narrow(channel_dim, channels, channels)

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        cumprod = float(self.alphas_cumprod[i])
        return x / cumprod**0.5 - eps * (1 / cumprod - 1) ** 0.5

    def log_variance(self, logits: torch.Tensor | None, i: int) -> torch.Tensor | float:
        if logits is None:
            return float(self.fixed_large_log_variance[i])
        low, high = float(self.posterior_log_variance_clipped[i]), float(torch.log(self.betas[i]))
        frac = (logits + 1) / 2
        return frac * high + (1 - frac) * low


def sample_diffusion(
    model: NoiseModel,
    noise: torch.Tensor,
    *,
    steps: int,
    sampler: str = "ddpm",
    channel_dim: int = -1,
    learn_sigma: bool = True,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise `noise` (B, ...) with `model(x, timestep) -> output` (timestep: a float index of
    the 1000-step process) over `steps` respaced steps.
    The output holds the noise prediction in its first C channels along `channel_dim` (C = the
    input's channels) and, with `learn_sigma`, the variance logits in the next C. `eta` is DDIM's
    stochasticity (0: deterministic). Returns float32 samples (float64 if `noise` is)."""
    if sampler not in DIFFUSION_SAMPLERS:
        raise ValueError(f"unknown diffusion sampler {sampler!r}; expected one of {DIFFUSION_SAMPLERS}")
    schedule = GaussianDiffusion(steps, learn_sigma=learn_sigma)
    x = noise.double() if noise.dtype == torch.float64 else noise.float()
    channels = x.shape[channel_dim]
    for i in progress_iter(range(schedule.num_steps - 1, -1, -1), progress, sampler.upper()):
        output = model(x, float(schedule.timestep_map[i])).to(x.dtype)
        eps, logits = schedule.split_output(output, channel_dim, channels)
        x0 = schedule.predict_x0(x, eps, i)
        if sampler == "ddpm":
            mean = float(schedule.posterior_mean_coef1[i]) * x0 + float(schedule.posterior_mean_coef2[i]) * x
            log_variance = schedule.log_variance(logits, i)
            # A Python float unless the variance is learned: no host-to-device copy (and wait) a step.
            std = (0.5 * log_variance).exp() if isinstance(log_variance, torch.Tensor) else math.exp(0.5 * log_variance)
        else:
            cumprod, previous = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
            std = eta * ((1 - previous) / (1 - cumprod) * (1 - cumprod / previous)) ** 0.5
            mean = x0 * previous**0.5 + (1 - previous - std**2) ** 0.5 * eps
        if i > 0 and not (isinstance(std, float) and std == 0.0):
            x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return x
