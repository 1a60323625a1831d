"""Tokenizer configuration: the authors' flat `ModelArgs` fields, the ViT sizes behind the timm
model names they use, and random-weight presets of the released sizes.

A released `config.json` is a flat dict of `ModelArgs` fields; `SoftVQConfig` keeps every field
(also the training-only ones) so that `save_pretrained` writes the same file back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from softvq_fast.models import fields


@dataclass(frozen=True)
class ViTSpec:
    """Width, depth, heads and MLP of one DINOv2 ViT (timm's definitions, LayerScale 1e-5,
    LayerNorm eps 1e-6, qkv bias). `reg_tokens` > 0 means register tokens and position
    embeddings for the image patches only (timm's `no_embed_class`)."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    swiglu: bool = False
    reg_tokens: int = 0


_DINOV2_SIZES = {
    "small": ViTSpec(384, 12, 6, 1536),
    "base": ViTSpec(768, 12, 12, 3072),
    "large": ViTSpec(1024, 24, 16, 4096),
    # timm's giant: SwiGLU whose fc1 packs gate and value (2 x 4096), fc2 takes 4096.
    "giant": ViTSpec(1536, 40, 24, 8192, swiglu=True),
}


def vit_spec(model_name: str) -> ViTSpec:
    """The ViT behind a timm DINOv2 name such as `vit_base_patch14_reg4_dinov2.lvd142m`.

    The patch size in the name is not used: the tokenizer's config sets it (`enc_patch_size`)."""
    arch = model_name.split(".", 1)[0]
    for size, spec in _DINOV2_SIZES.items():
        if arch == f"vit_{size}_patch14_dinov2":
            return spec
        if arch == f"vit_{size}_patch14_reg4_dinov2":
            return dataclasses.replace(spec, reg_tokens=4)
    known = ", ".join(
        f"vit_{size}_patch14{reg}_dinov2.lvd142m" for size in _DINOV2_SIZES for reg in ("", "_reg4")
    )
    raise ValueError(f"unknown ViT model name {model_name!r}; expected one of: {known}")


@dataclass
class SoftVQConfig:
    """The authors' `ModelArgs` (continuous_tokenizer, modelling/tokenizer.py). Fields used here:
    image_size, codebook_*, tau, num_codebooks, encoder_model/decoder_model (sizes),
    enc/dec_patch_size, num_latent_tokens, dec_cls_token, use_ape/use_rope/rope_mixed/rope_theta,
    base_image_size, to_pixel, vq_mean, vq_std. The others are kept only to round-trip the file."""

    image_size: int = 256
    base_image_size: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    vq_loss_ratio: float = 1.0
    kl_loss_weight: float = 0.000001
    tau: float = 0.1
    num_codebooks: int = 1
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    enc_type: str = "vit"
    dec_type: str = "vit"
    encoder_model: str = "vit_small_patch14_dinov2.lvd142m"
    decoder_model: str = "vit_small_patch14_dinov2.lvd142m"
    num_latent_tokens: int = 32
    to_pixel: str = "linear"
    enc_tuning_method: str = "full"
    dec_tuning_method: str = "full"
    enc_pretrained: bool = False
    dec_pretrained: bool = False
    enc_patch_size: int = 16
    dec_patch_size: int = 16
    enc_drop_path_rate: float = 0.0
    dec_drop_path_rate: float = 0.0
    dec_cls_token: bool = True
    use_ape: bool = True
    use_rope: bool = False
    rope_mixed: bool = False
    rope_theta: float = 10.0
    repa: bool = False
    repa_patch_size: int = 16
    repa_model: str = "vit_base_patch16_224"
    repa_proj_dim: int = 2048
    repa_loss_weight: float = 0.1
    repa_align: str = "global"
    vq_mean: float = 0.0
    vq_std: float = 1.0
    enc_token_drop: float = 0.0
    enc_token_drop_max: float = 0.6
    # depth overrides: set by the loader when a checkpoint holds fewer blocks than the name implies
    encoder_depth: int | None = None
    decoder_depth: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "SoftVQConfig":
        """Build from a `config.json` dict. Fields this class does not know are ignored (the
        authors' later `ModelArgs` grew fields for other tokenizers)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        """The `config.json` dict: the authors' fields only (a loader takes the depth from the
        checkpoint's blocks)."""
        values = dataclasses.asdict(self)
        del values["encoder_depth"], values["decoder_depth"]
        return values

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is expected, for any value this
        implementation cannot run: the type and range of every field (the training-only ones
        too), then the relations between fields."""
        for name in _COUNTS:
            fields.integer(name, getattr(self, name))
        for name in ("encoder_depth", "decoder_depth"):
            fields.optional_integer(name, getattr(self, name))
        for name in _FLAGS:
            fields.boolean(name, getattr(self, name))
        for name in _NAMES:
            fields.text(name, getattr(self, name))
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            fields.integer_list(name, getattr(self, name))
        for name in _WEIGHTS:
            fields.real(name, getattr(self, name), at_least=0)
        for name in _RATES:
            fields.real(name, getattr(self, name), at_least=0, at_most=1)
        fields.real("tau", self.tau, above=0)  # softmax temperature of the soft quantiser
        fields.real("vq_mean", self.vq_mean)
        fields.real("vq_std", self.vq_std, above=0)  # generators' latents are (z - vq_mean) / vq_std
        fields.real("rope_theta", self.rope_theta, above=0)
        fields.text("enc_type", self.enc_type, ("vit",))  # the authors' CNN tokenizers are not implemented
        fields.text("dec_type", self.dec_type, ("vit",))
        fields.text("to_pixel", self.to_pixel, ("linear",))  # the released pixel head
        # Relations: whole patches, whole token segments per codebook.
        patch_names = ("enc_patch_size", "dec_patch_size")
        sizes = ("image_size", "base_image_size") if self.use_rope and self.rope_mixed else ("image_size",)
        for size in sizes:
            for patch in patch_names:
                if getattr(self, size) % getattr(self, patch):
                    raise ValueError(f"{size}={getattr(self, size)} must be a multiple of {patch}={getattr(self, patch)}")
        if self.num_latent_tokens % self.num_codebooks:
            raise ValueError(
                f"num_latent_tokens={self.num_latent_tokens} must be divisible by num_codebooks={self.num_codebooks} "
                "(each codebook quantises one contiguous segment of the tokens)"
            )
        vit_spec(self.encoder_model)
        decoder = vit_spec(self.decoder_model)
        if not self.dec_cls_token and decoder.reg_tokens == 0:
            raise ValueError(
                "dec_cls_token=False needs a register model (..._reg4_dinov2): without registers the "
                "decoder's position table includes the class token"
            )


# Field groups of SoftVQConfig by the check they take (besides those checked one by one).
_COUNTS = ("image_size", "base_image_size", "codebook_size", "codebook_embed_dim", "num_codebooks", "num_latent_tokens",
           "enc_patch_size", "dec_patch_size", "z_channels", "repa_patch_size", "repa_proj_dim")
_FLAGS = ("codebook_l2_norm", "codebook_show_usage", "enc_pretrained", "dec_pretrained", "dec_cls_token", "use_ape",
          "use_rope", "rope_mixed", "repa")
_NAMES = ("encoder_model", "decoder_model", "enc_tuning_method", "dec_tuning_method", "repa_model", "repa_align")
_WEIGHTS = ("commit_loss_beta", "entropy_loss_ratio", "vq_loss_ratio", "kl_loss_weight", "repa_loss_weight")
_RATES = ("dropout_p", "enc_drop_path_rate", "dec_drop_path_rate", "enc_token_drop", "enc_token_drop_max")


def _preset(size: str, tokens: int, image_size: int) -> SoftVQConfig:
    encoder, decoder = {"s": ("small", "small"), "b": ("base", "base"), "bl": ("base", "large"), "l": ("large", "large")}[size]
    return SoftVQConfig(
        image_size=image_size,
        base_image_size=image_size,
        codebook_size=8192,
        codebook_embed_dim=32,
        codebook_show_usage=False,
        tau=0.07,
        num_codebooks=4,
        encoder_model=f"vit_{encoder}_patch14_dinov2.lvd142m",
        decoder_model=f"vit_{decoder}_patch14_dinov2.lvd142m",
        num_latent_tokens=tokens,
    )


# Random-weight models of the released sizes (BL = ViT-B encoder, ViT-L decoder). Codebooks as in
# the authors' checkpoint layout: 4 codebooks of 8192 x 32.
PRESETS: dict[str, SoftVQConfig] = {
    f"softvq-{size}-{tokens}{'' if px == 256 else f'-{px}'}": _preset(size, tokens, px)
    for size in ("s", "b", "bl", "l")
    for tokens in (32, 64)
    for px in (256, 512)
}


def preset_config(name: str) -> SoftVQConfig:
    """A copy of the preset's config; raises ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
