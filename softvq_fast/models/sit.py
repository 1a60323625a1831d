"""SiT: the flow-matching (velocity-predicting) adaLN-Zero transformer of the authors' release.

Time t runs in [0, 1] (1 = noise, 0 = data on the linear path) and enters the timestep embedder
unscaled. `path_type`, `use_cfg` and `decoder_hidden_size` are fields of the release config;
the released models have no REPA projectors (training-only), so neither does this class.
"""
from __future__ import annotations

from typing import Any

from softvq_fast.models import fields
from softvq_fast.models.adaln_transformer import AdaLNTransformer, preset_kwargs


class SiT(AdaLNTransformer):
    """SiT on 1-D tokens (`vae_1d=True`: x (B, input_size, in_channels)) or 2-D latents
    (x (B, in_channels, input_size, input_size), patch_size x patch_size patches). Predicts a
    velocity with the input's shape.

    Network arguments as in `AdaLNTransformer` (input_size, patch_size, in_channels,
    hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob, num_classes, vae_1d, qk_norm).
    `path_type` (the training path, a default for sampling), `use_cfg` and `encoder_depth` are
    kept as attributes; `decoder_hidden_size` must equal hidden_size."""

    def __init__(
        self,
        *,
        path_type: str = "linear",
        use_cfg: bool = False,
        decoder_hidden_size: int | None = None,
        encoder_depth: int | None = None,
        **network: Any,
    ) -> None:
        fields.text("path_type", path_type)
        fields.boolean("use_cfg", use_cfg)
        fields.optional_integer("decoder_hidden_size", decoder_hidden_size)
        fields.optional_integer("encoder_depth", encoder_depth)
        hidden_size = fields.integer("hidden_size", network.get("hidden_size", 1152))
        if decoder_hidden_size not in (None, hidden_size):
            raise ValueError(
                f"decoder_hidden_size={decoder_hidden_size} must equal hidden_size={hidden_size}: "
                "the final layer reads the last block's output"
            )
        super().__init__(**network)
        self.path_type = path_type
        self.use_cfg = use_cfg
        self.encoder_depth = encoder_depth

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "SiT":
        """`SiT.from_preset("SiT-XL/1", input_size=64, in_channels=32, vae_1d=True)`: sizes S/B/L/XL
        (depth 12/12/24/28, hidden 384/768/1024/1152), random weights."""
        return cls(**preset_kwargs(name, "SiT"), **kwargs)
