"""DiT: the noise-predicting adaLN-Zero transformer of the authors' release (DDPM/DDIM sampling).

t is the (possibly respaced-and-mapped) diffusion timestep in [0, 1000). With `learn_sigma` the
output has 2 * in_channels channels: the noise, then the variance interpolation logits.
"""
from __future__ import annotations

from softvq_fast.models.adaln_transformer import AdaLNTransformer, preset_kwargs


class DiT(AdaLNTransformer):
    """DiT on 1-D tokens (`vae_1d=True`: x (B, input_size, in_channels)) or 2-D latents
    (x (B, in_channels, input_size, input_size))."""

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        patch_size: int = 2,
        vae_1d: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=2 * in_channels if learn_sigma else in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            vae_1d=vae_1d,
            qk_norm=qk_norm,
        )
        self.learn_sigma = learn_sigma

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DiT":
        """`DiT.from_preset("DiT-XL/1", input_size=32, in_channels=32, vae_1d=True)`, random weights."""
        return cls(**preset_kwargs(name, "DiT"), **kwargs)
