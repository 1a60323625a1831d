"""The tokenizer in training: built new from a config (the ViTs initialised as timm does, the
encoder from DINOv2 weights as the authors start it) or fine-tuned from a release folder (the
training-only parts a release holds are kept, the missing ones created); the frozen DINOv2 of
representation alignment; and the export of a trained tokenizer to the release layout with its
latent statistics (`vq_mean`, `vq_std`) measured on images.

The representation-alignment projector is the tokenizer's submodule `projection` (the authors'
state-dict keys `projection.0/2/4.*`): the tokenizer's optimiser and EMA hold it, releases carry
it, `SoftVQVAE.from_pretrained` ignores it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from softvq_fast import hub
from softvq_fast.models import checkpoint, fields
from softvq_fast.models.config import SoftVQConfig, preset_config, vit_spec
from softvq_fast.models.softvq_vae import SoftVQVAE
from softvq_fast.training.frozen import FrozenDINOv2, load_dinov2, load_dinov2_weights
from softvq_fast.training.tokenizer_losses import AlignmentProjector

__all__ = [
    "training_config",
    "tokenizer_for_training",
    "init_encoder_from_dinov2",
    "load_alignment_network",
    "LatentStatistics",
    "measure_latent_statistics",
    "export_release",
]

PROJECTION = "projection"
# timm's VisionTransformer initialisation of its linear layers (the authors' ViTs when not
# loaded from pretrained weights): normal of this standard deviation truncated to [-2, 2] (100
# standard deviations: a plain normal, which torch draws far faster than its trunc_normal_), zero bias.
VIT_LINEAR_STD = 0.02


def training_config(preset: str) -> SoftVQConfig:
    """A preset's architecture (softvq_fast.models.PRESETS, e.g. "softvq-l-64") with the training
    fields of the authors' configs/softvq-l-64.yaml: entropy_loss_ratio 0.01, no VQ or commitment
    loss, the encoder started from DINOv2 (enc_pretrained), the decoder from scratch, and
    representation alignment ("repeat") to the DINOv2 of the encoder's size at patch 16 through
    a projector of hidden width 1024."""
    config = preset_config(preset)
    return dataclasses.replace(
        config, entropy_loss_ratio=0.01, vq_loss_ratio=0.0, commit_loss_beta=0.0, enc_pretrained=True,
        dec_pretrained=False, repa=True, repa_model=config.encoder_model, repa_patch_size=16, repa_proj_dim=1024,
        repa_align="repeat",
    )


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draws from torch's CPU generator seeded with `seed` (its state restored after); nothing
    changes when seed is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _init_vits_like_timm(model: SoftVQVAE) -> None:
    for backbone in (model.encoder.model, model.decoder.model):
        for module in backbone.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=VIT_LINEAR_STD)
                nn.init.zeros_(module.bias)


def _check_trainable(config: SoftVQConfig) -> None:
    """ValueError naming a training field of the authors' ModelArgs that this trainer does not
    implement (their softvq-l-64 setting uses none of them)."""
    fields.text("enc_tuning_method", config.enc_tuning_method, ("full",))  # no LoRA / frozen encoder
    fields.text("dec_tuning_method", config.dec_tuning_method, ("full",))
    if config.dec_pretrained:
        raise ValueError("dec_pretrained must be false: the decoder starts from scratch (a DINOv2 start is "
                         "implemented for the encoder only)")
    if config.enc_token_drop > 0:
        raise ValueError(f"enc_token_drop must be 0 (encoder token drop is not implemented), got {config.enc_token_drop}")


def _check_alignment_fields(config: SoftVQConfig) -> int:
    """The width of the alignment DINOv2 (config.repa_model); ValueError naming the field that
    representation alignment cannot run with."""
    fields.text("repa_align", config.repa_align, ("repeat",))  # each latent token over N / T patches
    try:
        spec = vit_spec(config.repa_model)
    except ValueError as exc:
        raise ValueError(f"repa_model: {exc}") from None
    if spec.swiglu:
        raise ValueError(f"repa_model={config.repa_model!r}: the alignment DINOv2 must be a ViT-S/B/L (not the giant)")
    size, patch, tokens = config.image_size, config.repa_patch_size, config.num_latent_tokens
    if size % patch or (size // patch) ** 2 % tokens:
        raise ValueError(
            f"repa_patch_size={patch}: the alignment network's (image_size / repa_patch_size)^2 patches "
            f"(image_size={size}) must be a whole multiple of num_latent_tokens={tokens}"
        )
    return spec.width


def _projector(config: SoftVQConfig, stored: dict[str, torch.Tensor], source: Path | None, seed: int | None) -> AlignmentProjector:
    """The release's projector (`stored`: its keys without the `projection.` prefix) or a new one
    (codebook_embed_dim -> repa_proj_dim -> repa_proj_dim -> the alignment DINOv2's width)."""
    width = _check_alignment_fields(config)
    if not stored:
        with _seeded(None if seed is None else seed + 1):
            return AlignmentProjector(config.codebook_embed_dim, config.repa_proj_dim, width)
    first = stored.get("0.weight")
    hidden = first.shape[0] if first is not None and first.dim() == 2 else config.repa_proj_dim
    with torch.device("meta"):
        projector = AlignmentProjector(config.codebook_embed_dim, hidden, width)
    expected = {f"{PROJECTION}.{key}": value for key, value in projector.state_dict().items()}
    checkpoint.check_keys(expected, {f"{PROJECTION}.{key}": value for key, value in stored.items()}, source)
    projector.load_state_dict({key: value.float() for key, value in stored.items()}, strict=True, assign=True)
    return projector


def tokenizer_for_training(
    source: SoftVQConfig | str | os.PathLike,
    *,
    encoder_weights: str | os.PathLike | None = None,
    alignment: bool | None = None,
    revision: str | None = None,
    seed: int | None = None,
    attention_backend: str = "auto",
    soft_vq_backend: str = "auto",
    linear_backend: str = "auto",
) -> SoftVQVAE:
    """A SoftVQVAE to train (float32, on the CPU, in training mode).

    source: a SoftVQConfig (`training_config(preset)` gives the authors' setting) for new weights,
        the ViTs' linear layers initialised as timm does; or a release folder / Hugging Face Hub
        repo id (`SoftVQVAE.from_pretrained`'s sources, at `revision`) to fine-tune, its
        weights cast to float32 and its projector (`projection.*`) kept.
    encoder_weights: a DINOv2 weights file of the encoder's size (official or timm layout) that
        the new encoder starts from (patch kernel and positions resampled to the config's patch
        size and grid); required when the config says enc_pretrained. Not for a release, whose
        encoder is already trained.
    alignment: give the model the representation-alignment projector `projection` (None: when
        config.repa is true or the release holds a projector); one is created where the release
        has none, and config.repa follows. The config's repa_align must be "repeat" and
        repa_model a DINOv2 ViT-S/B/L name (ValueError naming the field).
    seed: seeds the new weights (torch's global generator is left as it was); None draws from it.

    Parameters that no forward reads (SoftVQVAE.unused_parameter_names) are frozen."""
    stored: dict[str, torch.Tensor] = {}
    source_file: Path | None = None
    backends = dict(attention_backend=attention_backend, soft_vq_backend=soft_vq_backend, linear_backend=linear_backend)
    if isinstance(source, SoftVQConfig):
        config = dataclasses.replace(source)
        _check_trainable(config)
        with _seeded(seed):
            model = SoftVQVAE(config, **backends)
            _init_vits_like_timm(model)
        if encoder_weights is not None:
            init_encoder_from_dinov2(model, encoder_weights)
            config.enc_pretrained = True
        elif config.enc_pretrained:
            raise ValueError(
                "encoder_weights: the config says enc_pretrained=true (the encoder starts from DINOv2 "
                f"{config.encoder_model}): pass its weights file, or set enc_pretrained to false"
            )
    else:
        if encoder_weights is not None:
            raise ValueError(f"encoder_weights: {source} is a release whose encoder is already trained; "
                             "DINOv2 weights initialise the encoder of a new tokenizer (a SoftVQConfig source)")
        directory = hub.resolve(source, revision=revision)
        config = checkpoint.read_config(directory)
        _check_trainable(config)
        state, source_file = checkpoint.read_state_dict(directory)
        model = SoftVQVAE.from_state_dict(config, state, source_file, **backends)
        prefix = PROJECTION + "."
        stored = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if alignment is None:
        alignment = config.repa or bool(stored)
    if alignment:
        model.projection = _projector(config, stored, source_file, seed)
    config.repa = bool(alignment)
    frozen = set(model.unused_parameter_names())
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return model.train()


def init_encoder_from_dinov2(model: SoftVQVAE, source: str | os.PathLike) -> Path:
    """Overwrite the encoder's ViT (`encoder.model`) with the DINOv2 weights of
    config.encoder_model from a local file (official `dinov2_vit{s,b,l}14[_reg4]_pretrain.pth` or
    timm layout), the patch kernel and the position table resampled to the config's patch size
    and grid (the authors' patch-14 -> patch-16 start). The latent tokens and everything after the
    encoder keep their values. Returns the file; FrozenWeightsError naming it and the layout."""
    return load_dinov2_weights(model.encoder.model, source, model.config.encoder_model)


def load_alignment_network(config: SoftVQConfig, source: str | os.PathLike, *, depth: int | None = None,
                           attention_backend: str = "auto") -> FrozenDINOv2:
    """The frozen DINOv2 config.repa_model of representation alignment from a local file, on
    images of config.image_size in patches of config.repa_patch_size: (B, 3, S, S) ->
    (B, (S / repa_patch_size)^2, width). `depth`: the blocks of a file cut shorter than the model."""
    _check_alignment_fields(config)
    return load_dinov2(source, config.repa_model, image_size=config.image_size, patch_size=config.repa_patch_size,
                       depth=depth, attention_backend=attention_backend)


@dataclass(frozen=True)
class LatentStatistics:
    """Mean and standard deviation (population) over every element of the soft-quantised
    latents of `images` images: a release's scalar vq_mean, vq_std."""

    mean: float
    std: float
    images: int


@torch.no_grad()
def measure_latent_statistics(model: SoftVQVAE, images: Iterable, max_images: int, *,
                              autocast_dtype: torch.dtype | None = None) -> LatentStatistics:
    """Encode at most `max_images` images (batches (B, 3, S, S) in [-1, 1], or objects with an
    `images` attribute such as image_data.ImageBatch) in eval mode and measure the latents' mean
    and std (sums in float64). Under an initialised process group every rank encodes its own
    images and the statistics are those of all ranks' latents. The model's mode is restored."""
    max_images = fields.integer("max_images", max_images)
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # sum, sum of squares, elements, images
    was_training = model.training
    model.eval()
    try:
        for batch in images:
            x = getattr(batch, "images", batch)[: max_images - int(sums[3])]
            if x.shape[0]:
                z = model.encode(x.to(device), autocast_dtype=autocast_dtype).double()
                sums += torch.stack([z.sum(), z.square().sum(), z.new_tensor(z.numel()), z.new_tensor(x.shape[0])])
            if sums[3] >= max_images:
                break
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    total, total_sq, elements, count = sums.tolist()
    if count == 0:
        raise ValueError("images: no image to measure the latent statistics on")
    mean = total / elements
    std = math.sqrt(max(total_sq / elements - mean * mean, 0.0))
    if not std > 0:
        raise ValueError(f"the latents of {int(count)} images have no spread (std {std}): vq_std must be > 0")
    return LatentStatistics(mean, std, int(count))


def export_release(model: SoftVQVAE, directory: str | os.PathLike, statistics: LatentStatistics) -> Path:
    """Write `model` (e.g. the EMA tokenizer) to `directory` in the release layout (config.json +
    model.safetensors, the projector's keys included) with vq_mean / vq_std from `statistics`,
    so that SoftVQVAE.from_pretrained, encode-dataset and generate take it directly."""
    config = dataclasses.replace(model.config, vq_mean=statistics.mean, vq_std=statistics.std)
    config.validate()
    directory = Path(directory)
    checkpoint.write_release(directory, config, model.state_dict())
    return directory
