"""Flow-matching samplers for velocity-predicting models (SiT), integrating from t = 1 (noise)
to t = 0 (data).

Interpolation paths x_t = alpha(t) * x_0 + sigma(t) * noise:
  linear  alpha = 1 - t,          sigma = t
  cosine  alpha = cos(pi t / 2),  sigma = sin(pi t / 2)   (variance preserving, "GVP")
The model predicts the velocity v = alpha'(t) x_0 + sigma'(t) noise.

Samplers (`velocity(x, t)` takes the state and the time as a Python float and returns v):
  euler, heun   probability-flow ODE on t_k = 1 - k / steps; Heun skips its corrector on the
                last step (t = 0), so `steps` Heun steps cost 2 * steps - 1 evaluations
  sde           Euler-Maruyama on the reverse SDE with diffusion w(t) = 2t and the score derived
                from the velocity, on t_k evenly from 1 to 0.04, then one deterministic step to 0
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
PATHS = ("linear", "cosine")
FLOW_SAMPLERS = ("euler", "heun", "sde")
SDE_LAST_T = 0.04


def path_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, d alpha / dt, d sigma / dt) of the named path at times t."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(half_pi * t),
            torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
            half_pi * torch.cos(half_pi * t),
        )
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path: str) -> torch.Tensor:
    """The score grad log p_t(x) implied by the velocity v at (x, t)."""
    alpha, sigma, d_alpha, d_sigma = (float(c) for c in path_coefficients(path, torch.tensor(t, dtype=torch.float64)))
    ratio = alpha / d_alpha
    variance = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / variance


def progress_iter(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False)


def sample_flow(
    velocity: Velocity,
    noise: torch.Tensor,
    *,
    steps: int,
    sampler: str = "euler",
    path: str = "linear",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from `noise` (any shape (B, ...), the state at t = 1) to t = 0 and return the
    samples, in float32 unless `noise` is float64. `generator` drives the SDE's noise."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r}; expected one of {FLOW_SAMPLERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    path_coefficients(path, torch.zeros(1))  # validates the name before any model call
    x = noise.double() if noise.dtype == torch.float64 else noise.float()
    if sampler == "sde":
        return _euler_maruyama(velocity, x, steps, path, generator, progress)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i in progress_iter(range(steps), progress, f"{sampler} ODE"):
        t_cur, t_next = grid[i], grid[i + 1]
        d_cur = velocity(x, t_cur).to(x.dtype)
        x_next = x + (t_next - t_cur) * d_cur
        if sampler == "heun" and i < steps - 1:
            d_next = velocity(x_next, t_next).to(x.dtype)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


def _euler_maruyama(
    velocity: Velocity,
    x: torch.Tensor,
    steps: int,
    path: str,
    generator: torch.Generator | None,
    progress: bool,
) -> torch.Tensor:
    grid = torch.linspace(1.0, SDE_LAST_T, steps, dtype=torch.float64).tolist() + [0.0]
    for i in progress_iter(range(steps), progress, "Euler-Maruyama SDE"):
        t_cur, t_next = grid[i], grid[i + 1]
        v = velocity(x, t_cur).to(x.dtype)
        diffusion = 2.0 * t_cur
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, t_cur, path)
        dt = t_next - t_cur
        x = x + drift * dt
        if i < steps - 1:  # the last step to t = 0 returns the mean
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(diffusion * abs(dt)) * noise
    return x
