"""DiT: the noise-predicting adaLN-Zero transformer of the authors' release (DDPM/DDIM sampling).

t is the (possibly respaced-and-mapped) diffusion timestep in [0, 1000). With `learn_sigma` the
output has 2 * in_channels channels: the noise, then the variance interpolation logits.
`noise_schedule` is the beta schedule the model was trained with, which sampling must use; the
authors' release configs do not record it, and their SoftVQ DiTs (1-D tokens) are trained and
sampled with the cosine schedule, hence the default for `vae_1d` models.
"""
from __future__ import annotations

from typing import Any

from softvq_fast.models import fields
from softvq_fast.models.adaln_transformer import AdaLNTransformer, preset_kwargs
from softvq_fast.sampling.diffusion import NOISE_SCHEDULES


def default_noise_schedule(vae_1d: bool) -> str:
    """The schedule a DiT config without `noise_schedule` was trained with (module docstring)."""
    return "cosine" if vae_1d else "linear"


class DiT(AdaLNTransformer):
    """DiT on 1-D tokens (`vae_1d=True`: x (B, input_size, in_channels)) or 2-D latents
    (x (B, in_channels, input_size, input_size)). Network arguments as in `AdaLNTransformer`.
    noise_schedule: "linear" or "cosine"; None: cosine with `vae_1d`, linear otherwise."""

    def __init__(self, *, learn_sigma: bool = True, noise_schedule: str | None = None, **network: Any) -> None:
        fields.boolean("learn_sigma", learn_sigma)
        in_channels = fields.integer("in_channels", network.get("in_channels", 4))
        if noise_schedule is None:
            noise_schedule = default_noise_schedule(network.get("vae_1d", False))
        fields.text("noise_schedule", noise_schedule, NOISE_SCHEDULES)
        super().__init__(out_channels=2 * in_channels if learn_sigma else in_channels, **network)
        self.learn_sigma = learn_sigma
        self.noise_schedule = noise_schedule

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "DiT":
        """`DiT.from_preset("DiT-XL/1", input_size=32, in_channels=32, vae_1d=True)`, random weights."""
        return cls(**preset_kwargs(name, "DiT"), **kwargs)
