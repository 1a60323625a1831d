"""DDPM and DDIM sampling for noise-predicting models (DiT), with respaced timesteps and
learned variances; `GaussianDiffusion` also holds the schedule maths training uses
(softvq_fast.training), so that both read one copy.

The base process has 1000 steps with the named beta schedule of the authors' DiT code:
  linear  betas evenly from 1e-4 * 1000/T to 0.02 * 1000/T (T steps; DiT's default)
  cosine  beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), abar(s) = cos((s + 0.008)/1.008 * pi/2)^2
Respacing keeps `steps` evenly spaced timesteps of it (rounded, first and last included) and
recomputes the betas between them from the kept cumulative alphas; the model is called with the
original timestep index. With a learned sigma the model's extra channels v in [-1, 1]
interpolate the log variance between the posterior variance (v = -1) and beta (v = 1); without
one the variance is "fixed large" (beta, with the posterior variance at the first step).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Union

import torch

from softvq_fast.sampling.flow import progress_iter

NoiseModel = Callable[[torch.Tensor, float], torch.Tensor]
# A step of the (respaced) schedule: a Python int (sampling: one step for the whole batch) or a
# (B,) integer tensor (training: one step per sample).
Step = Union[int, torch.Tensor]
DIFFUSION_SAMPLERS = ("ddpm", "ddim")
NOISE_SCHEDULES = ("linear", "cosine")
TRAIN_STEPS = 1000
COSINE_OFFSET = 0.008
MAX_BETA = 0.999


def beta_schedule(name: str, num_train_steps: int = TRAIN_STEPS) -> torch.Tensor:
    """(num_train_steps,) float64 betas of the named schedule (see the module docstring)."""
    if name == "linear":
        scale = 1000 / num_train_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_train_steps, dtype=torch.float64)
    if name == "cosine":

        def alpha_bar(s: float) -> float:
            return math.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        steps = num_train_steps
        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), MAX_BETA) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown noise_schedule {name!r}; expected one of {NOISE_SCHEDULES}")


def respaced_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """`steps` evenly spaced indices of 0 .. num_train_steps - 1, both ends included."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if steps == 1:
        return [0]
    stride = (num_train_steps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


class GaussianDiffusion:
    """The respaced schedule (float64 tensors on the CPU, indexed by the respaced step) and the
    per-step maths of the process. Methods take a `Step`: an int i gives Python-float
    coefficients (one step for the batch), a (B,) integer tensor gives per-sample coefficients
    shaped (B, 1, ..., 1) in the dtype and on the device of the tensor they multiply."""

    def __init__(
        self,
        steps: int = TRAIN_STEPS,
        *,
        num_train_steps: int = TRAIN_STEPS,
        learn_sigma: bool = True,
        noise_schedule: str = "linear",
    ) -> None:
        base_cumprod = torch.cumprod(1 - beta_schedule(noise_schedule, num_train_steps), 0)
        self.timestep_map = respaced_timesteps(num_train_steps, steps)
        self.learn_sigma = learn_sigma
        self.noise_schedule = noise_schedule
        cumprod = base_cumprod[self.timestep_map]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
        self.betas = 1 - cumprod / previous
        self.log_betas = torch.log(self.betas)
        self.alphas_cumprod = cumprod
        self.alphas_cumprod_prev = previous
        self.sqrt_alphas_cumprod = cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / cumprod - 1).sqrt()
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

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        """A copy with every table on `device`, so that per-sample lookups with steps there copy
        nothing from the host (a blocking copy on CUDA)."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(moved, name, value.to(device))
        return moved

    @staticmethod
    def at(table: torch.Tensor, i: Step, like: torch.Tensor) -> torch.Tensor | float:
        """table[i] as a Python float (int i), or table[i] (B,) reshaped to broadcast against
        `like` (B, ...), on i's device, in like's dtype but at least float32 (tensor i)."""
        if isinstance(i, int):
            return float(table[i])
        values = table.to(i.device)[i].to(torch.promote_types(like.dtype, torch.float32))
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def split_output(self, output: torch.Tensor, channel_dim: int, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(predicted noise, variance logits or None) from the model output."""
        eps = output.narrow(channel_dim, 0, channels)
        if not self.learn_sigma:
            return eps, None
        return eps, output.narrow(channel_dim, channels, channels)

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, i: Step) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self.at(self.sqrt_alphas_cumprod, i, x0) * x0 + self.at(self.sqrt_one_minus_alphas_cumprod, i, x0) * noise

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: Step) -> torch.Tensor:
        """x0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps."""
        return self.at(self.sqrt_recip_alphas_cumprod, i, x) * x - self.at(self.sqrt_recipm1_alphas_cumprod, i, x) * eps

    def posterior_mean(self, x0: torch.Tensor, x: torch.Tensor, i: Step) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x0): coef1_t x0 + coef2_t x_t."""
        return self.at(self.posterior_mean_coef1, i, x) * x0 + self.at(self.posterior_mean_coef2, i, x) * x

    def log_variance(self, logits: torch.Tensor | None, i: Step) -> torch.Tensor | float:
        """The model's log variance at step i: the learned-range interpolation of the variance
        logits, or without logits the fixed-large value (a float; int i only)."""
        if logits is None:
            return float(self.fixed_large_log_variance[i])
        low, high = self.at(self.posterior_log_variance_clipped, i, logits), self.at(self.log_betas, i, logits)
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
    noise_schedule: str = "linear",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise `noise` (B, ...) with `model(x, timestep) -> output` (timestep: a float index of
    the 1000-step process) over `steps` respaced steps.
    The output holds the noise prediction in its first C channels along `channel_dim` (C = the
    input's channels) and, with `learn_sigma`, the variance logits in the next C. `noise_schedule`
    is the one the model was trained with ("linear" or "cosine"). `eta` is DDIM's stochasticity
    (0: deterministic). Returns float32 samples (float64 if `noise` is)."""
    if sampler not in DIFFUSION_SAMPLERS:
        raise ValueError(f"unknown diffusion sampler {sampler!r}; expected one of {DIFFUSION_SAMPLERS}")
    schedule = GaussianDiffusion(steps, learn_sigma=learn_sigma, noise_schedule=noise_schedule)
    x = noise.double() if noise.dtype == torch.float64 else noise.float()
    channels = x.shape[channel_dim]
    for i in progress_iter(range(schedule.num_steps - 1, -1, -1), progress, sampler.upper()):
        output = model(x, float(schedule.timestep_map[i])).to(x.dtype)
        eps, logits = schedule.split_output(output, channel_dim, channels)
        x0 = schedule.predict_x0(x, eps, i)
        if sampler == "ddpm":
            mean = schedule.posterior_mean(x0, x, i)
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
