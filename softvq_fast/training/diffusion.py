"""The variational-bound term of DDPM training with a learned variance (improved DDPM), in bits
per dimension, on the schedule maths of `softvq_fast.sampling.diffusion.GaussianDiffusion`.

For a step t > 0 it is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) between two diagonal
Gaussians; at t = 0 the negative log-likelihood of x_0 under p(x_0 | x_1) discretised to 256
bins of width 2/255 on [-1, 1] (the outermost bins open to +-infinity), with the standard normal
CDF taken as 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))). Both are averaged over the non-batch
dimensions and divided by ln 2.
"""
from __future__ import annotations

import math

import torch

from softvq_fast.sampling.diffusion import GaussianDiffusion

BIN_HALF_WIDTH = 1.0 / 255.0
EDGE = 0.999  # |x0| beyond this falls in an outermost, open bin
LOG_FLOOR = 1e-12


def mean_over_samples(values: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): the mean over every dimension but the first."""
    return values.mean(dim=tuple(range(1, values.ndim)))


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats:
    0.5 (log_var2 - log_var1 + e^(log_var1 - log_var2) + (mean1 - mean2)^2 e^-log_var2 - 1)."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def approx_standard_normal_cdf(u: torch.Tensor) -> torch.Tensor:
    """Phi(u) ~ 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(bin of x) in nats under N(mean, e^(2 log_scale)), x on the 256-level grid of
    [-1, 1]: log Phi(upper edge) below -0.999, log (1 - Phi(lower edge)) above 0.999, else
    log (Phi(upper) - Phi(lower)); probabilities floored at 1e-12. All of x's shape."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - BIN_HALF_WIDTH))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=LOG_FLOOR))
    log_survival_lower = torch.log((1.0 - cdf_lower).clamp(min=LOG_FLOOR))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=LOG_FLOOR))
    return torch.where(x < -EDGE, log_cdf_upper, torch.where(x > EDGE, log_survival_lower, log_bin))


def variational_bound_bits(
    schedule: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    variance_logits: torch.Tensor,
) -> torch.Tensor:
    """The per-sample (B,) variational-bound term in bits per dimension.

    x0, x_t, eps (predicted noise) and variance_logits are (B, ...) of one shape; t (B,) integer
    steps of `schedule`. The model's p(x_{t-1} | x_t) has mean posterior_mean(predict_x0(x_t,
    eps), x_t) and the learned-range log variance of the logits. Pass eps detached to train only
    the variance through this term (as DDPM training does)."""
    true_mean = schedule.posterior_mean(x0, x_t, t)
    true_log_variance = schedule.at(schedule.posterior_log_variance_clipped, t, x0)
    model_mean = schedule.posterior_mean(schedule.predict_x0(x_t, eps, t), x_t, t)
    model_log_variance = schedule.log_variance(variance_logits, t)
    kl = mean_over_samples(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    decoder_nll = mean_over_samples(nll) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)
