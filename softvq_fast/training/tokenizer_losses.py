"""The SoftVQ-VAE tokenizer's loss terms as functions of tensors (the trainer weights and
schedules them; see loss_config.py). Definitions follow the authors' training code:

  reconstruction        mean((x - x̂)²)
  generator (hinge)     -mean(D(x̂))
  discriminator (hinge) 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))
  LeCAM                 mean relu(D(x) - ema_fake)² + mean relu(ema_real - D(x̂))², the EMAs of the
                        mean logits updated (decay 0.999, from 0) by the call, before the term
  consistency           mean over both batches of (D(aug x) - D(strong aug x))², real and fake
  alignment             -mean over tokens of cos(proj(z_t), f_n), each latent token z_t (after the
                        projector) repeated over N / T consecutive patch features f_n of the frozen
                        DINOv2 on the real image
  adaptive weight       ‖∇_last nll‖ / (‖∇_last adv‖ + 1e-4) clamped to [0, 1e4] (off by default)

The entropy regulariser is softvq_fast.soft_vq(..., return_stats=True).stats.entropy_loss;
`pooled_entropy` takes its mean code distribution over the batch of all processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from softvq_fast.nn.linear import Linear
from softvq_fast.training.discriminator import all_reduce_sum

__all__ = [
    "reconstruction_loss",
    "pooled_entropy",
    "generator_hinge_loss",
    "discriminator_hinge_loss",
    "LeCAMEMA",
    "lecam_regulariser",
    "consistency_loss",
    "AlignmentProjector",
    "alignment_loss",
    "adaptive_weight",
]


def _same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _negative_entropy(column_sum: torch.Tensor, rows: torch.Tensor | int) -> torch.Tensor:
    """Σ p log(p + 1e-6) of the mean distribution p = column_sum summed over codebooks / rows."""
    mean_probs = column_sum.sum(dim=0) / rows
    return (mean_probs * torch.log(mean_probs + 1e-6)).sum()


def pooled_entropy(entropy_loss: torch.Tensor, column_sum: torch.Tensor, rows: int) -> torch.Tensor:
    """The soft-VQ entropy regulariser with its mean code distribution taken over the tokens of
    all processes (the authors take it over each GPU's batch), so that P processes holding parts
    of a batch train as one process holding all of it. entropy_loss: this process's regulariser
    (mean row entropy minus the entropy of its own mean distribution); column_sum (C, K): the
    sums of its `rows` token distributions (SoftVQStats.column_sum). Without an initialised group
    of more than one process: entropy_loss. The mean row entropy stays per process (gradient
    averaging over the processes makes it the batch mean); every rank must call this."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return entropy_loss
    total_rows = torch.tensor(float(rows), device=column_sum.device)
    dist.all_reduce(total_rows)
    pooled = all_reduce_sum(column_sum.float())
    return entropy_loss - _negative_entropy(column_sum.float(), rows) + _negative_entropy(pooled, total_rows)


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (scalar)."""
    _same_shape("images", images, "reconstructions", reconstructions)
    return F.mse_loss(reconstructions, images)


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The tokenizer's adversarial loss: -mean(fake_logits)."""
    return -fake_logits.mean()


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


class LeCAMEMA:
    """Exponential moving averages of the discriminator's mean real and fake logits (float64
    scalars, starting at `init`), updated at every discriminator step. Under an initialised
    process group the means are averaged over the ranks first (global-batch semantics): every
    rank must call `update` (lecam_regulariser calls it)."""

    def __init__(self, decay: float = 0.999, init: float = 0.0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1]")
        self.decay = decay
        self.real = torch.tensor(init, dtype=torch.float64)
        self.fake = torch.tensor(init, dtype=torch.float64)

    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        means = torch.stack([real_logits.detach().mean(), fake_logits.detach().mean()]).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        previous = torch.stack([self.real, self.fake]).to(means.device)
        updated = previous * self.decay + means * (1.0 - self.decay)
        self.real, self.fake = updated[0], updated[1]

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        return {"decay": self.decay, "real": self.real.cpu(), "fake": self.fake.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor | float]) -> None:
        missing = {"decay", "real", "fake"} - set(state)
        if missing:
            raise KeyError(f"LeCAMEMA state lacks {sorted(missing)}")
        self.decay = float(state["decay"])
        self.real = torch.as_tensor(state["real"], dtype=torch.float64)
        self.fake = torch.as_tensor(state["fake"], dtype=torch.float64)


def lecam_regulariser(real_logits: torch.Tensor, fake_logits: torch.Tensor, ema: LeCAMEMA) -> torch.Tensor:
    """Update `ema` with these logits, then mean relu(real - ema.fake)² + mean relu(ema.real -
    fake)² (the authors' order). Call it at every discriminator step, also while its weight is 0,
    so that the averages follow the discriminator from the start."""
    ema.update(real_logits, fake_logits)
    ema_fake = ema.fake.to(device=real_logits.device, dtype=real_logits.dtype)
    ema_real = ema.real.to(device=fake_logits.device, dtype=fake_logits.dtype)
    return F.relu(real_logits - ema_fake).square().mean() + F.relu(ema_real - fake_logits).square().mean()


def consistency_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                     strong_real_logits: torch.Tensor, strong_fake_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the logits of the (DiffAugment-ed) views and those of the
    strongly augmented views, over the real and fake batches together. Gradients flow into both."""
    _same_shape("real_logits", real_logits, "strong_real_logits", strong_real_logits)
    _same_shape("fake_logits", fake_logits, "strong_fake_logits", strong_fake_logits)
    return F.mse_loss(torch.cat([real_logits, fake_logits]), torch.cat([strong_real_logits, strong_fake_logits]))


class AlignmentProjector(nn.Sequential):
    """The per-token MLP of representation alignment: Linear(in, hidden) -> SiLU ->
    Linear(hidden, hidden) -> SiLU -> Linear(hidden, out) on (..., in) -> (..., out). State-dict
    keys 0.*, 2.*, 4.* (the authors' `projection`)."""

    def __init__(self, in_dim: int = 32, hidden_dim: int = 1024, out_dim: int = 1024) -> None:
        super().__init__(
            Linear(in_dim, hidden_dim), nn.SiLU(),
            Linear(hidden_dim, hidden_dim), nn.SiLU(),
            Linear(hidden_dim, out_dim),
        )


def alignment_loss(projected_tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """-mean cosine similarity between projected latent tokens (B, T, D), each repeated over N / T
    consecutive positions, and patch features (B, N, D) (both L2-normalised, eps 1e-12)."""
    if projected_tokens.dim() != 3 or features.dim() != 3:
        raise ValueError(
            f"projected_tokens (B, T, D) and features (B, N, D) expected, got {tuple(projected_tokens.shape)} "
            f"and {tuple(features.shape)}"
        )
    (b, t, d), (fb, n, fd) = projected_tokens.shape, features.shape
    if (b, d) != (fb, fd) or n % t:
        raise ValueError(
            f"projected_tokens {tuple(projected_tokens.shape)} and features {tuple(features.shape)}: batch and "
            f"width must match and the feature count N must be a multiple of the token count T"
        )
    tokens = F.normalize(projected_tokens, dim=-1).repeat_interleave(n // t, dim=1)
    return -(tokens * F.normalize(features, dim=-1)).sum(dim=-1).mean()


def adaptive_weight(nll_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """‖∂nll/∂last_layer‖ / (‖∂adv/∂last_layer‖ + eps), clamped to [0, max_weight], detached (the
    graph is kept for the backward of the total loss)."""
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    adversarial_grad, = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (adversarial_grad.norm() + eps)).clamp(0.0, max_weight).detach()
